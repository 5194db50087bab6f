"""A paged KVarN cache for serving engines: byte layout of a tile, fp16 staging, the per-step plan,
and attention over the paged cache (PyTorch; engine-agnostic, so it is tested without vLLM).

Shape letters: H KV heads, Hq query heads, G tokens per tile (= the engine's block size, so one
block holds one tile), D head_dim, T tokens of a step, S staging slots.

Storage, per layer:

* ``pages [num_blocks, page_bytes]`` uint8, owned by the engine. Block ``b`` holds one *completed*
  tile, encoded by ``kvarn.quant.codec`` and laid out by ``TileLayout`` (``tile_bytes`` bytes: the
  same number ``kvarn.quant.formats.tile_bytes`` counts, so capacity math has one source).
* ``staging [S, 2, H, G, D]`` fp16, owned by the runtime: the open (not yet full) tile of each
  running sequence and, when the recipe keeps it, each sequence's first tile in fp16.

The rule the reference (``kvarn.quant.attention``) defines: a query at position ``p`` reads
completed tiles below its own quantized, the first tile (if kept) and its own tile in fp16. A tile
is encoded in the step that fills it; queries of that step inside the tile still read it in fp16
from the step's own values, later ones read the encoded page.

``StagingTable`` maps block ids to staging slots. It is shared by every layer of one engine (block
ids are), and ``plan`` runs once per engine step. What it cannot know is when the engine frees a
block; it learns that a block was reused when a new tile starts in it. Slots of blocks that are
not referenced by the current step are evicted when the pool is full: first-tile copies first (a
first tile is also written to its page, so a sequence whose copy was evicted reads it quantized:
less exact than the recipe, never wrong data), then open tails (least recently used), and the pool
grows rather than evict a slot the current step uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import KvarnError
from ..quant.attention import mixed_attention, quantized_read_mask
from ..quant.codec import EncodedTiles, decode_tiles, encode_tiles
from ..quant.formats import FP16_BITS, LayerFormat, TensorFormat, head_tile_bytes, tile_bytes

logger = logging.getLogger(__name__)

FIRST, OPEN = "first", "open"
NULL_BLOCK = 0  # engines keep block 0 as a placeholder (vLLM's null block); never a real tile


def check_storable(fmt: LayerFormat, where: str) -> None:
    """Raise a one-line KvarnError unless every head of ``fmt`` has a stored form."""
    for kind, tf in (("K", fmt.k), ("V", fmt.v)):
        if tf.codec == "rtn-sym" and any(b != FP16_BITS for b in tf.bits):
            raise KvarnError(f"{where}: {kind} codec 'rtn-sym' is an evaluation baseline with no stored form; "
                             "use a kvarn recipe or preset (codec 'rtn')")


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Group:
    """Heads of one layer that share a tensor (K or V) and a code width."""

    kind: str  # "k" or "v"
    bits: int
    heads: torch.Tensor  # [h] long
    index: torch.Tensor  # [h * seg] long: byte positions of these heads' segments in a record
    fields: tuple  # ((name, nbytes), ...) in the order they are stored in a segment
    seg: int


class TileLayout:
    """Byte layout of one layer's encoded tile (all KV heads, K then V, head by head).

    A head's segment is ``codes | scale | zero | norm`` (the parts ``EncodedTiles`` has; fp16 and
    fp8 heads store only codes). ``nbytes == kvarn.quant.formats.tile_bytes(fmt)``.
    ``k_log_std``/``v_log_std``: ``[H, D]`` recipe priors or None.
    """

    def __init__(self, fmt: LayerFormat, k_log_std: torch.Tensor | None, v_log_std: torch.Tensor | None):
        check_storable(fmt, "layer format")
        self.fmt = fmt
        self.tile, self.head_dim, self.num_kv_heads = fmt.tile, fmt.head_dim, fmt.num_kv_heads
        self.priors = {"k": k_log_std, "v": v_log_std}
        self.formats = {"k": fmt.k, "v": fmt.v}
        offsets, off = {}, 0
        for kind, tf in self.formats.items():
            for h, b in enumerate(tf.bits):
                offsets[kind, h] = off
                off += head_tile_bytes(tf, b, self.tile, self.head_dim)
        self.nbytes = off
        if off != tile_bytes(fmt):  # the capacity math and the layout must agree byte for byte
            raise AssertionError(f"layout has {off} bytes per tile, formats.tile_bytes says {tile_bytes(fmt)}")
        groups = []
        for kind, tf in self.formats.items():
            for b in sorted(set(tf.bits)):
                heads = [h for h, hb in enumerate(tf.bits) if hb == b]
                fields = self._fields(tf, b)
                seg = sum(n for _, n in fields)
                index = torch.cat([torch.arange(offsets[kind, h], offsets[kind, h] + seg) for h in heads])
                groups.append(_Group(kind, b, torch.tensor(heads), index, fields, seg))
        self.groups = groups

    def _fields(self, tf: TensorFormat, bits: int) -> tuple:
        g, d = self.tile, self.head_dim
        if bits == FP16_BITS:
            return (("codes", g * d * 2),)
        if tf.codec == "fp8":
            return (("codes", g * d),)
        params = d * 2 if tf.axis == "channel" else g * 2
        out = [("codes", g * d * bits // 8), ("scale", params), ("zero", params)]
        if tf.normalize == "tile":
            out.append(("norm", g * 2 if tf.axis == "channel" else d * 2))
        return tuple(out)

    def _prior(self, grp: _Group, device) -> torch.Tensor | None:
        p = self.priors[grp.kind]
        return None if p is None else p.to(device)[grp.heads.to(device)][:, None, :]  # [h, 1, D]

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Records ``[n, nbytes]`` uint8 of ``n`` tiles; ``k``, ``v``: ``[H, n, G, D]`` float."""
        n = k.shape[1]
        rec = torch.empty(n, self.nbytes, dtype=torch.uint8, device=k.device)
        for grp in self.groups:
            x = (k if grp.kind == "k" else v)[grp.heads.to(k.device)]
            enc = encode_tiles(x, self.formats[grp.kind], grp.bits, self._prior(grp, k.device))
            parts = [t for t in (enc.codes, enc.scale, enc.zero, enc.norm) if t is not None]
            raw = torch.cat([t.contiguous().view(torch.uint8).reshape(len(grp.heads), n, -1) for t in parts], -1)
            rec[:, grp.index.to(k.device)] = raw.transpose(0, 1).reshape(n, -1)
        return rec

    def decode(self, rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)`` float32 ``[H, n, G, D]`` from records ``[n, >= nbytes]`` uint8."""
        n, g, d = rec.shape[0], self.tile, self.head_dim
        out = {kind: torch.empty(self.num_kv_heads, n, g, d, dtype=torch.float32, device=rec.device) for kind in "kv"}
        for grp in self.groups:
            h = len(grp.heads)
            raw = rec[:, grp.index.to(rec.device)].reshape(n, h, grp.seg).transpose(0, 1)
            parts, at = {}, 0
            for name, nb in grp.fields:
                parts[name] = raw[..., at:at + nb].contiguous()
                at += nb
            tf = self.formats[grp.kind]
            if grp.bits == FP16_BITS or tf.codec == "fp8":
                dtype = torch.float16 if grp.bits == FP16_BITS else torch.float8_e4m3fn
                enc = EncodedTiles(grp.bits, parts["codes"].view(dtype).reshape(h, n, g, d))
            else:
                channel = tf.axis == "channel"
                pshape = (h, n, 1, d) if channel else (h, n, g, 1)
                nshape = (h, n, g, 1) if channel else (h, n, 1, d)
                enc = EncodedTiles(
                    grp.bits, parts["codes"].reshape(h, n, g, d * grp.bits // 8),
                    parts["scale"].view(torch.float16).reshape(pshape), parts["zero"].view(torch.float16).reshape(pshape),
                    parts["norm"].view(torch.float16).reshape(nshape) if "norm" in parts else None,
                )
            out[grp.kind][grp.heads.to(rec.device)] = decode_tiles(enc, tf, d, self._prior(grp, rec.device))
        return out["k"], out["v"]


# ---------------------------------------------------------------------------------------------
def kvarn_presets() -> list[str]:
    """Calibration-free kvarn layouts a runtime can serve (uniform bits, tile 128)."""
    from ..quant.scheme import PRESETS

    return [p for p in PRESETS if p.startswith("kvarn-")]


@dataclass(frozen=True)
class CacheSource:
    """What a runtime needs from a recipe or a preset. ``k_log_std``/``v_log_std``: ``[L, H, D]`` or None."""

    name: str
    formats: tuple
    keep_first_tile: bool
    k_log_std: torch.Tensor | None = None
    v_log_std: torch.Tensor | None = None
    recipe: object = None  # the Recipe, when the source is a recipe file

    @property
    def tile(self) -> int:
        return self.formats[0].tile

    @property
    def num_layers(self) -> int:
        return len(self.formats)

    def layout(self, layer: int) -> TileLayout:
        pick = lambda t: None if t is None else t[layer]  # noqa: E731
        return TileLayout(self.formats[layer], pick(self.k_log_std), pick(self.v_log_std))

    def tile_bytes(self) -> list[int]:
        """Bytes of one encoded tile per layer (the page size of a block of ``tile`` tokens)."""
        return [tile_bytes(f) for f in self.formats]

    def staging_slot_bytes(self) -> int:
        """fp16 bytes of one staging slot over all layers (K and V of one tile)."""
        return sum(2 * f.num_kv_heads * f.tile * f.head_dim * 2 for f in self.formats)


def staging_slots(max_num_seqs: int, keep_first_tile: bool) -> int:
    """Slots that hold every running sequence's open tile (and fp16 first tile), plus two spare."""
    return max_num_seqs * (2 if keep_first_tile else 1) + 2


def load_source(spec: str, num_layers: int, num_kv_heads: int, head_dim: int) -> CacheSource:
    """A preset name (``kvarn-k4v2-g128``...) or a recipe path; raises one-line ``KvarnError``s."""
    from ..quant.hadamard import check_head_dim
    from ..quant.scheme import preset_scheme
    from ..recipe import Recipe

    if spec in kvarn_presets():
        check_head_dim(head_dim, f"preset {spec}: model head_dim")
        s = preset_scheme(spec, num_layers, num_kv_heads, head_dim)
        return CacheSource(spec, tuple(s.layers), s.keep_first_tile)
    r = Recipe.load(spec)
    fmts = tuple(r.layer_formats())
    for i, f in enumerate(fmts):
        check_storable(f, f"{spec}: layer {i}")
    return CacheSource(str(spec), fmts, r.keep_first_tile, r.k_log_std, r.v_log_std, r)


# ---------------------------------------------------------------------------------------------
@dataclass
class SeqStep:
    """What one sequence does in one engine step (the same for every layer).

    Rows ``[q_start, q_end)`` of the step's tokens are positions ``[ctx, seq)``; ``blocks[i]`` is
    the block of tile ``i``. Slots index the staging pool: ``old_slot`` holds tokens
    ``[ctx // G * G, ctx)`` (None when ``ctx`` starts a tile), ``new_slot`` receives the open tail
    ``[seq // G * G, seq)`` (None when ``seq`` ends on a tile), ``first_slot`` is the fp16 first
    tile (read, or written this step when ``first_write``). ``dummy``: a placeholder row (null
    block) that must not touch the cache.
    """

    q_start: int
    q_end: int
    ctx: int
    seq: int
    blocks: list[int]
    old_slot: int | None = None
    new_slot: int | None = None
    first_slot: int | None = None
    first_write: bool = False
    dummy: bool = False


@dataclass
class _Entry:
    slot: int
    kind: str
    tile: int
    used: int  # step it was last referenced


@dataclass
class StagingTable:
    """Block id → staging slot, for one engine (all layers). See the module docstring."""

    num_slots: int
    tile: int
    keep_first_tile: bool
    entries: dict = field(default_factory=dict)
    step: int = 0
    grown: int = 0

    def __post_init__(self):
        self.free = list(range(self.num_slots - 1, -1, -1))
        self._released: list[int] = []

    def _drop(self, block: int) -> None:
        e = self.entries.pop(block, None)
        if e is not None:
            self._released.append(e.slot)

    def _alloc(self) -> int:
        if self.free:
            return self.free.pop()
        idle = [(b, e) for b, e in self.entries.items() if e.used < self.step]
        if idle:
            # first-tile copies go first (their tile is also in its page), then the oldest tail
            block, e = min(idle, key=lambda be: (be[1].kind != FIRST, be[1].used))
            del self.entries[block]
            return e.slot
        self.num_slots += 1
        self.grown += 1
        if self.grown in (1, 64, 4096):
            logger.warning("kvarn: fp16 staging pool grew to %d slots (more open tiles in one step than reserved)",
                           self.num_slots)
        return self.num_slots - 1

    def _use(self, block: int, kind: str, tile: int) -> _Entry | None:
        e = self.entries.get(block)
        if e is None or e.kind != kind or e.tile != tile:
            return None
        e.used = self.step
        return e

    def plan(self, seqs: list[tuple[int, int, int, int, list[int]]]) -> list[SeqStep]:
        """One engine step: ``seqs`` = ``(q_start, q_end, ctx, seq, blocks)`` per scheduled sequence."""
        self.step += 1
        self.free.extend(self._released)  # slots released last step: nobody reads them any more
        self._released = []
        g, out = self.tile, []
        for _, _, ctx, _, blocks in seqs:  # mark what this step reads before anything is evicted
            for block in ((blocks[ctx // g],) if ctx % g else ()) + ((blocks[0],) if ctx >= g else ()):
                if block in self.entries:
                    self.entries[block].used = self.step
        for q_start, q_end, ctx, seq, blocks in seqs:
            st = SeqStep(q_start, q_end, ctx, seq, blocks)
            out.append(st)
            t_c, t_done = ctx // g, seq // g
            if any(b == NULL_BLOCK for b in blocks[: -(-seq // g)]):
                st.dummy = True
                continue
            if ctx % g:
                e = self._use(blocks[t_c], OPEN, t_c)
                if e is None:
                    raise RuntimeError(
                        f"kvarn: the fp16 tail of block {blocks[t_c]} (tokens {t_c * g}..{ctx}) is gone; the staging "
                        f"pool ({self.num_slots} slots) was evicted under a live sequence"
                    )
                st.old_slot = e.slot
            # tiles that start in this step are new (or reused) blocks: forget what they held
            for t in range(t_c + (1 if ctx % g else 0), -(-seq // g)):
                self._drop(blocks[t])
            if self.keep_first_tile and t_c >= 1:
                e = self._use(blocks[0], FIRST, 0)
                st.first_slot = None if e is None else e.slot
            if self.keep_first_tile and t_c == 0 and t_done >= 1:
                st.first_write = True
                st.first_slot = st.old_slot if st.old_slot is not None else self._alloc()
                self.entries[blocks[0]] = _Entry(st.first_slot, FIRST, 0, self.step)
            if seq % g:
                if t_c == t_done and st.old_slot is not None:
                    st.new_slot = st.old_slot
                else:
                    st.new_slot = self._alloc()
                    self.entries[blocks[t_done]] = _Entry(st.new_slot, OPEN, t_done, self.step)
            if st.old_slot is not None and st.old_slot not in (st.new_slot, st.first_slot):
                self.entries.pop(blocks[t_c], None)
                self._released.append(st.old_slot)
        return out


# ---------------------------------------------------------------------------------------------
def _causal_bias(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    return torch.zeros(len(q_pos), len(k_pos), device=q_pos.device).masked_fill(
        k_pos[None, :] > q_pos[:, None], float("-inf"))


def attend_layer(
    layout: TileLayout, keep_first_tile: bool, pages: torch.Tensor, staging: torch.Tensor,
    steps: list[SeqStep], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    out: torch.Tensor,
) -> None:
    """Store this step's keys/values of one layer and write attention into ``out``.

    pages ``[num_blocks, >= layout.nbytes]`` uint8; staging ``[S, 2, H, G, D]`` fp16;
    q ``[T, Hq, D]``, k/v ``[T, H, D]`` (model dtype), out ``[T, Hq, D]``.
    """
    g, nb = layout.tile, layout.nbytes
    dev = q.device
    for st in steps:
        rows = slice(st.q_start, st.q_end)
        qr = q[rows].transpose(0, 1)[None].float()  # [1, Hq, Tq, D]
        if st.dummy:
            kr, vr = k[rows].transpose(0, 1)[None].float(), v[rows].transpose(0, 1)[None].float()
            pos = torch.arange(st.q_end - st.q_start, device=dev)
            o = mixed_attention(qr, kr, vr, None, None, None, _causal_bias(pos, pos), scale)
            out[rows] = o[0].transpose(0, 1).to(out.dtype)
            continue
        t_c, t_done = st.ctx // g, st.seq // g
        n_old = st.ctx - t_c * g
        span_k, span_v = k[rows].transpose(0, 1).float(), v[rows].transpose(0, 1).float()  # [H, q, D]
        if n_old:
            span_k = torch.cat([staging[st.old_slot, 0, :, :n_old].float(), span_k], 1)
            span_v = torch.cat([staging[st.old_slot, 1, :, :n_old].float(), span_v], 1)
        span_k16, span_v16 = span_k.half(), span_v.half()
        n_new_tiles = t_done - t_c
        h, d = span_k.shape[0], span_k.shape[2]
        if n_new_tiles:
            kt = span_k[:, : n_new_tiles * g].reshape(h, n_new_tiles, g, d)
            vt = span_v[:, : n_new_tiles * g].reshape(h, n_new_tiles, g, d)
            rec = layout.encode(kt, vt)
            ids = torch.tensor(st.blocks[t_c:t_done], device=dev)
            pages[ids, :nb] = rec
            k_new_hat, v_new_hat = layout.decode(rec)
        if st.first_write:
            staging[st.first_slot, 0] = span_k16[:, :g]
            staging[st.first_slot, 1] = span_v16[:, :g]
        if st.new_slot is not None:
            tail = st.seq - t_done * g
            staging[st.new_slot, 0, :, :tail] = span_k16[:, -tail:]
            staging[st.new_slot, 1, :, :tail] = span_v16[:, -tail:]
        # what the queries read: [0, t_c*G) from pages (+ fp16 first tile), the span from this step
        k16, v16 = [span_k16.float()], [span_v16.float()]
        k_hat, v_hat = [], []
        first_fp16 = keep_first_tile and (t_c == 0 or st.first_slot is not None)
        if t_c:
            ids = torch.tensor(st.blocks[:t_c], device=dev)
            ko, vo = layout.decode(pages[ids])
            ko, vo = ko.reshape(h, t_c * g, d), vo.reshape(h, t_c * g, d)
            k_hat.append(ko)
            v_hat.append(vo)
            if keep_first_tile and st.first_slot is not None:
                ko = torch.cat([staging[st.first_slot, 0].float(), ko[:, g:]], 1)
                vo = torch.cat([staging[st.first_slot, 1].float(), vo[:, g:]], 1)
            k16.insert(0, ko)
            v16.insert(0, vo)
        if n_new_tiles:
            k_hat.append(k_new_hat.reshape(h, n_new_tiles * g, d))
            v_hat.append(v_new_hat.reshape(h, n_new_tiles * g, d))
        tail = st.seq - t_done * g
        if tail:
            k_hat.append(span_k16[:, -tail:].float())
            v_hat.append(span_v16[:, -tail:].float())
        q_pos = torch.arange(st.ctx, st.seq, device=dev)
        k_pos = torch.arange(st.seq, device=dev)
        mask = quantized_read_mask(q_pos, k_pos, g, first_fp16)
        o = mixed_attention(qr, torch.cat(k16, 1)[None], torch.cat(v16, 1)[None], torch.cat(k_hat, 1)[None],
                            torch.cat(v_hat, 1)[None], mask, _causal_bias(q_pos, k_pos), scale)
        out[rows] = o[0].transpose(0, 1).to(out.dtype)
