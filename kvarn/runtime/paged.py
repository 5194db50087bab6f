"""A paged KVarN cache for serving engines: byte layout of a tile, fp16 staging, the per-step plan,
and attention over the paged cache (PyTorch; engine-agnostic, so it is tested without vLLM).

Shape letters: H KV heads, Hq query heads, G tokens per tile (= the engine's block size, so one
block holds one tile), D head_dim, T tokens of a step, S staging slots.

Storage, per layer:

* ``pages [num_blocks, page_bytes]`` uint8, owned by the engine. Block ``b`` holds one *completed*
  tile, laid out by ``kvarn.ops.layout.PageLayout`` (``tile_bytes`` bytes: the same number
  ``kvarn.quant.formats.tile_bytes`` counts, so capacity math has one source).
* ``staging [S, 2, H, G, D]`` fp16, owned by the runtime: the open (not yet full) tile of each
  running sequence and, when the recipe keeps it, each sequence's first tile in fp16.

The rule the reference (``kvarn.quant.attention``) defines: a query at position ``p`` reads
completed tiles below its own quantized, the first tile (if kept) and its own tile in fp16. A tile
is encoded in the step that fills it; queries of that step inside the tile still read it in fp16
from the step's own values, later ones read the encoded page.

``StagingTable`` maps block ids to staging slots. It is shared by every layer of one engine (block
ids are), and ``plan`` runs once per engine step. What it cannot know is when the engine frees a
block unless told (``release``: the vLLM plugin passes the blocks of finished requests, whose open
tails are dropped and whose first-tile copies stay, first in line for eviction, for prefix-cache
hits); it also learns that a block was reused when a new tile starts in it.

The pool has a fixed size (``staging_slots``: two slots per sequence the engine may run, plus
spares for the steps in which a prefill chunk holds its old tail and its new one), allocated before
the engine's memory profile and never grown. When no slot is free, the least recently used entry
the step does not read is evicted, released ones first (otherwise a preempted sequence's, or one
that sat this step out: the engine runs at most ``max_num_seqs`` sequences, whose entries fit the
pool). Evicting a *first-tile* copy is never wrong (a first tile is also in its page) but makes its
sequence read that tile quantized, less exact than the recipe: that is counted
(``first_tiles_lost``) and logged. A step that needs more slots than the pool has left
(not reachable with vLLM's scheduler and ``staging_slots``) stores its new first tiles quantized
only (counted and logged the same way); an open tail that finds no slot raises ``KvarnError``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import KvarnError
from ..ops.decode import decode, merge, paged_attention, partial_attention, varlen_attention
from ..ops.dequant import dequant_tiles
from ..ops.layout import PageLayout, check_storable
from ..parallel import rank_kv_heads
from ..ops.store import store_tiles
from ..ops.transfer import to_device
from ..quant.formats import tile_bytes

logger = logging.getLogger(__name__)

FIRST, OPEN = "first", "open"
NULL_BLOCK = 0  # engines keep block 0 as a placeholder (vLLM's null block); never a real tile


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

    def layout(self, layer: int) -> PageLayout:
        pick = lambda t: None if t is None else t[layer]  # noqa: E731
        return PageLayout(self.formats[layer], pick(self.k_log_std), pick(self.v_log_std))

    def tile_bytes(self) -> list[int]:
        """Bytes of one encoded tile per layer (the page size of a block of ``tile`` tokens)."""
        return [tile_bytes(f) for f in self.formats]

    def staging_slot_bytes(self) -> int:
        """fp16 bytes of one staging slot over all layers (K and V of one tile)."""
        return sum(2 * f.num_kv_heads * f.tile * f.head_dim * 2 for f in self.formats)

    def shard(self, heads: list[int]) -> "CacheSource":
        """The source of the KV heads one tensor-parallel rank owns (``rank_kv_heads``): each
        layer's widths and priors of those heads, in that order."""
        from dataclasses import replace

        fmts = tuple(replace(f, k=replace(f.k, bits=tuple(f.k.bits[h] for h in heads)),
                             v=replace(f.v, bits=tuple(f.v.bits[h] for h in heads))) for f in self.formats)
        pick = lambda t: None if t is None else t[:, list(heads)].contiguous()  # noqa: E731
        return CacheSource(f"{self.name} (KV heads {list(heads)})", fmts, self.keep_first_tile, pick(self.k_log_std),
                           pick(self.v_log_std), self.recipe)


def tp_page_bytes(source: CacheSource, tp_size: int) -> list[int]:
    """Per layer, the largest tile any rank stores: every rank's page of that layer has this size
    (vLLM requires one KV-cache spec per layer across ranks)."""
    h = source.formats[0].num_kv_heads
    shards = [source.shard(rank_kv_heads(h, tp_size, r)) for r in range(tp_size)]
    return [max(tile_bytes(s.formats[l]) for s in shards) for l in range(source.num_layers)]


def rank_bytes_per_token(source: CacheSource, tp_size: int) -> list[float]:
    """Bytes per cached token on each rank (all layers). vLLM gives every rank the same number of
    blocks, so the largest sets the capacity and the others leave part of their pool unused."""
    return [sum(tile_bytes(f) for f in source.shard(rank_kv_heads(source.formats[0].num_kv_heads, tp_size, r)).formats)
            / source.tile for r in range(tp_size)]


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
    row: int = -1  # the sequence's row in the engine's device block table (-1: none given)


@dataclass
class _Entry:
    slot: int
    kind: str
    tile: int
    used: int  # step it was last referenced
    released: bool = False  # its request finished (a first tile kept for prefix-cache hits): evicted first


@dataclass
class StagingTable:
    """Block id → staging slot, for one engine (all layers). See the module docstring."""

    num_slots: int
    tile: int
    keep_first_tile: bool
    entries: dict = field(default_factory=dict)
    step: int = 0
    first_tiles_lost: int = 0  # first tiles read quantized because their fp16 copy had no slot

    def __post_init__(self):
        self.free = list(range(self.num_slots - 1, -1, -1))
        self._released: list[int] = []
        self._lost: set[int] = set()  # blocks whose first tile was found without its fp16 copy

    def _drop(self, block: int) -> None:
        self._lost.discard(block)
        e = self.entries.pop(block, None)
        if e is not None:
            self._released.append(e.slot)

    def _alloc(self) -> int | None:
        """A free slot, else the slot of the least recently used entry this step does not read;
        None when every slot is in use by this step."""
        if self.free:
            return self.free.pop()
        idle = [(b, e) for b, e in self.entries.items() if e.used < self.step]
        if not idle:
            return None
        block, e = min(idle, key=lambda be: (not be[1].released, be[1].used, be[1].kind != FIRST))
        del self.entries[block]
        return e.slot

    def _first_missing(self, block: int) -> None:
        """A sequence reads the first tile of ``block`` from its page: counted once per block."""
        if block in self._lost:
            return
        self._lost.add(block)
        self.first_tiles_lost += 1
        if self.first_tiles_lost in (1, 64, 4096) or self.first_tiles_lost % 65536 == 0:
            logger.warning("kvarn: %d sequence(s) so far read their first tile quantized, less exact than the recipe: "
                           "its fp16 copy found no slot or was evicted (staging pool of %d slots, 2 per sequence of "
                           "--max-num-seqs; prefix-cached blocks of finished sequences lose it too)",
                           self.first_tiles_lost, self.num_slots)

    def _alloc_tail(self, block: int, t: int) -> int:
        slot = self._alloc()
        if slot is None:
            raise KvarnError(f"kvarn: no fp16 staging slot for the open tile {t} of block {block}: all {self.num_slots} "
                             "slots are read by this step; more sequences run than --max-num-seqs sized the pool for")
        return slot

    def release(self, blocks) -> None:
        """The engine's request holding ``blocks`` finished: open tails are dropped (their slots are
        free from the next step); a first-tile copy stays for a prefix-cache hit on its block but is
        evicted before any live entry."""
        for block in blocks:
            e = self.entries.get(block)
            if e is not None and e.kind == FIRST:
                e.released = True
            elif e is not None:
                self._drop(block)

    def _use(self, block: int, kind: str, tile: int) -> _Entry | None:
        e = self.entries.get(block)
        if e is None or e.kind != kind or e.tile != tile:
            return None
        e.used, e.released = self.step, False  # a released first tile read again: a prefix-cache hit
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
                    self.entries[block].released = False
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
                if e is None:
                    self._first_missing(blocks[0])
            if self.keep_first_tile and t_c == 0 and t_done >= 1:
                slot = st.old_slot if st.old_slot is not None else self._alloc()
                if slot is not None:  # else the pool is exhausted this step: later steps read the page
                    st.first_write, st.first_slot = True, slot
                    self.entries[blocks[0]] = _Entry(slot, FIRST, 0, self.step)
            if seq % g:
                if t_c == t_done and st.old_slot is not None:
                    st.new_slot = st.old_slot
                else:
                    st.new_slot = self._alloc_tail(blocks[t_done], t_done)
                    self.entries[blocks[t_done]] = _Entry(st.new_slot, OPEN, t_done, self.step)
            if st.old_slot is not None and st.old_slot not in (st.new_slot, st.first_slot if st.first_write else None):
                self.entries.pop(blocks[t_c], None)
                self._released.append(st.old_slot)
        return out


# ---------------------------------------------------------------------------------------------
@dataclass
class DecodeBatch:
    """The single-token decode rows of one engine step, as device tensors for ``ops.decode.decode``.

    Built once per step (by the engine's metadata builder; every layer reads it). ``rows``: the
    step's token row of each sequence. Its new key/value goes to staging slot ``cur_slot`` at
    ``write_pos``; the query reads tiles ``[page_start, q_tile)`` from pages, the fp16 first tile
    from ``first_slot`` (-1: none) and ``cur_len`` tokens of its own tile from ``cur_slot``.
    ``store_index`` (into the batch) are sequences whose tile this token completes: that tile is
    encoded from its slot into block ``store_blocks``.
    """

    rows: torch.Tensor
    block_table: torch.Tensor
    page_start: torch.Tensor
    q_tile: torch.Tensor
    first_slot: torch.Tensor
    cur_slot: torch.Tensor
    cur_len: torch.Tensor
    write_pos: torch.Tensor
    store_index: torch.Tensor
    store_blocks: torch.Tensor
    steps: tuple  # the SeqSteps it covers (the rest of the step takes the general path)
    row0: int = -1  # rows are row0, row0 + 1, ... (the usual case): read and written as views, no gathers

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])


def _is_decode(st: SeqStep) -> bool:
    return not st.dummy and st.q_end - st.q_start == 1


def decode_batch(steps: list[SeqStep], tile: int, keep_first_tile: bool, device) -> DecodeBatch | None:
    """The decode rows of a step's plan (None when it has none): host work once per step."""
    dec = [st for st in steps if _is_decode(st)]
    if not dec:
        return None
    g = tile
    width = max(-(-st.seq // g) for st in dec)
    cols = {name: [] for name in ("rows", "page_start", "q_tile", "first_slot", "cur_slot", "cur_len", "write_pos")}
    table = [[0] * width for _ in dec]
    store_index, store_blocks = [], []
    for j, st in enumerate(dec):
        t_q = (st.seq - 1) // g
        slot = st.old_slot if st.old_slot is not None else st.new_slot
        first = keep_first_tile and t_q >= 1 and st.first_slot is not None
        n_blocks = -(-st.seq // g)
        table[j][:n_blocks] = st.blocks[:n_blocks]
        for name, val in (("rows", st.q_start), ("page_start", 1 if first else 0), ("q_tile", t_q),
                          ("first_slot", st.first_slot if first else -1), ("cur_slot", slot),
                          ("cur_len", st.seq - t_q * g), ("write_pos", st.seq - 1 - t_q * g)):
            cols[name].append(val)
        if st.seq % g == 0:
            store_index.append(j)
            store_blocks.append(st.blocks[t_q])
    b, n_store = len(dec), len(store_index)
    # every column starts on 16 bytes: Triton compiles a kernel variant per pointer alignment, and
    # unpadded offsets (b * width + i * b) changed it with the batch size: compiles while serving
    at, bp = -(-b * width // 4) * 4, -(-b // 4) * 4
    pad = lambda col, n: col + [0] * (n - len(col))  # noqa: E731
    flat32 = to_device(pad([v for row in table for v in row], at)
                       + [v for name in ("page_start", "q_tile", "first_slot", "cur_slot", "cur_len")
                          for v in pad(cols[name], bp)] + store_blocks, torch.int32, device)
    bp64 = -(-b // 2) * 2
    flat64 = to_device(pad(cols["rows"], bp64) + pad(cols["write_pos"], bp64) + store_index, torch.int64, device)
    c32 = [flat32[at + i * bp: at + i * bp + b] for i in range(5)]
    row0 = cols["rows"][0] if cols["rows"] == list(range(cols["rows"][0], cols["rows"][0] + b)) else -1
    return DecodeBatch(flat64[:b], flat32[:b * width].view(b, width), *c32, flat64[bp64:bp64 + b],
                       flat64[2 * bp64:2 * bp64 + n_store], flat32[at + 5 * bp:at + 5 * bp + n_store], tuple(dec), row0)


def _attend_decode(layout: PageLayout, pages, staging, batch: DecodeBatch, q, k, v, scale, out, softcap=None,
                   graphs=None, layer: int = 0) -> None:
    """Decode rows with no Python per sequence: write the token to staging, encode tiles it
    completes, then one ``decode`` op (pages + staged fp16 part, merged inside the op).
    ``graphs``: a ``decode_graphs.DecodeGraphs`` replays the write and the op from a CUDA graph
    (the store follows it: the completing token reads its tile from staging, not from its page)."""
    sb = graphs.prepare(batch) if graphs is not None else None
    if sb is not None:
        graphs.run(layer, layout, pages, staging, sb, q, k, v, scale, out, softcap)
        _store_completed(layout, pages, staging, batch, batch.cur_slot.long())
        return
    # host time per op is what a decode layer costs (H200 profile: ~1 ms of host per layer against
    # ~0.5 ms of kernels), so contiguous rows are taken as views and the output written in place
    rows = slice(batch.row0, batch.row0 + batch.size) if batch.row0 >= 0 else batch.rows
    slots = batch.cur_slot.long()
    staging[slots, :, :, batch.write_pos] = torch.stack([k[rows], v[rows]], 1).to(staging.dtype)
    _store_completed(layout, pages, staging, batch, slots)
    direct = batch.row0 >= 0 and out.dtype == q.dtype and out.is_contiguous()
    o = decode(layout, pages, staging, q[rows], batch.block_table, batch.page_start, batch.q_tile, batch.first_slot,
               batch.cur_slot, batch.cur_len, scale, softcap, out=out[rows] if direct else None)
    if not direct:
        out[rows] = o.to(out.dtype)


def _store_completed(layout: PageLayout, pages, staging, batch: DecodeBatch, slots) -> None:
    """Encode the tiles this step's decode tokens complete, from their staging slots into pages."""
    if batch.store_index.numel():
        done = slots[batch.store_index]
        store_tiles(layout, pages, staging[done, 0], staging[done, 1], batch.store_blocks)


def attend_layer(
    layout: PageLayout, keep_first_tile: bool, pages: torch.Tensor, staging: torch.Tensor,
    steps: list[SeqStep], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    out: torch.Tensor, batch: DecodeBatch | None = None, prefill: str = "tiled", softcap: float | None = None,
    block_table: torch.Tensor | None = None, graphs=None, layer: int = 0,
) -> None:
    """Store this step's keys/values of one layer and write attention into ``out``.

    pages ``[num_blocks, >= layout.nbytes]`` uint8; staging ``[S, 2, H, G, D]`` fp16;
    q ``[T, Hq, D]``, k/v ``[T, H, D]`` (model dtype), out ``[T, Hq, D]``.

    Single-token decode rows take ``_attend_decode`` (``batch``: their ``decode_batch``, built here
    when the caller has none); the other rows (prefill chunks, placeholders) ``_attend_general``.
    ``prefill``: how a chunk reads the tiles it completes itself — ``"tiled"`` as the reference
    (quantized for its later tiles' queries), ``"raw"`` as serving engines do (the chunk attends
    over its own raw keys with FlashAttention; only what was cached before the chunk is read from
    the cache: quantized tiles, fp16 first tile and open tail). ``softcap``: the model's
    attention-logit cap (Gemma-2), applied to every score; None: none. ``block_table``: the
    engine's device block table (row ``SeqStep.row`` per sequence): block ids of prefill chunks are
    sliced from it on the device instead of copied from the host. ``graphs``/``layer``: decode rows
    through ``kvarn.runtime.decode_graphs`` (``layer`` keys the graph).
    """
    if prefill not in ("tiled", "raw"):
        raise ValueError(f"prefill must be 'tiled' or 'raw', not {prefill!r}")
    if batch is None:
        batch = decode_batch(steps, layout.tile, keep_first_tile, q.device)
    if batch is not None:
        _attend_decode(layout, pages, staging, batch, q, k, v, scale, out, softcap, graphs, layer)
        steps = [st for st in steps if not _is_decode(st)]
    if steps:
        ids = _BlockIds(steps, block_table, pages.device)
        spans = _stage(layout, keep_first_tile, pages, staging, steps, k, v, ids)
        if prefill == "tiled":
            _read_tiled(layout, keep_first_tile, pages, staging, steps, spans, q, k, v, scale, out, softcap)
        else:
            _read_raw(layout, keep_first_tile, pages, staging, steps, spans, q, k, v, scale, out, softcap, ids)


class _BlockIds:
    """Block ids ``blocks[a:b]`` of a step's sequence as an int64 device tensor: a slice of the
    engine's device block table where there is one (no host→device copy in ``forward``), else a
    copy of the host list."""

    def __init__(self, steps: list[SeqStep], block_table: torch.Tensor | None, device):
        self.table = block_table if block_table is not None and all(st.row >= 0 for st in steps) else None
        self.device = device

    def __call__(self, st: SeqStep, a: int, b: int) -> torch.Tensor:
        if self.table is not None:
            return self.table[st.row, a:b].long()
        return to_device(st.blocks[a:b], torch.int64, self.device)

    def cat(self, parts: list[tuple[SeqStep, int, int]]) -> torch.Tensor:
        if self.table is not None:
            return torch.cat([self.table[st.row, a:b] for st, a, b in parts]).long()
        return to_device([x for st, a, b in parts for x in st.blocks[a:b]], torch.int64, self.device)


def _stage(layout: PageLayout, keep_first_tile: bool, pages, staging, steps: list[SeqStep], k, v,
           ids: _BlockIds | None = None) -> list:
    """Rows of prefill chunks and placeholders (per sequence in Python: chunks are few per step):
    each sequence's fp16 span (its open tail from staging + the step's keys/values, ``[H, n, D]``),
    every tile the step completes encoded (all sequences, one ``store_tiles``), first tiles and new
    open tails written to staging. Returns the spans."""
    g = layout.tile
    dev = k.device
    ids = ids or _BlockIds(steps, None, dev)
    new_k, new_v, new_ids = [], [], []
    spans = []
    for st in steps:
        rows = slice(st.q_start, st.q_end)
        span_k, span_v = k[rows].transpose(0, 1).half(), v[rows].transpose(0, 1).half()  # [H, q, D]
        if st.dummy:
            spans.append((span_k, span_v))
            continue
        t_c, t_done = st.ctx // g, st.seq // g
        n_old = st.ctx - t_c * g
        if n_old:
            span_k = torch.cat([staging[st.old_slot, 0, :, :n_old], span_k], 1)
            span_v = torch.cat([staging[st.old_slot, 1, :, :n_old], span_v], 1)
        spans.append((span_k, span_v))
        if t_done > t_c:
            h, d = span_k.shape[0], span_k.shape[2]
            new_k.append(span_k[:, : (t_done - t_c) * g].reshape(h, -1, g, d).transpose(0, 1))
            new_v.append(span_v[:, : (t_done - t_c) * g].reshape(h, -1, g, d).transpose(0, 1))
            new_ids.append((st, t_c, t_done))
        if st.first_write:
            staging[st.first_slot, 0] = span_k[:, :g]
            staging[st.first_slot, 1] = span_v[:, :g]
        if st.new_slot is not None:
            tail = st.seq - t_done * g
            staging[st.new_slot, 0, :, :tail] = span_k[:, -tail:]
            staging[st.new_slot, 1, :, :tail] = span_v[:, -tail:]
    if new_ids:
        store_tiles(layout, pages, torch.cat(new_k), torch.cat(new_v), ids.cat(new_ids))
    return spans


def _block_table(steps: list[SeqStep], g: int) -> torch.Tensor:
    width = max(-(-st.seq // g) for st in steps)
    table = torch.zeros(len(steps), width, dtype=torch.int32)
    for j, st in enumerate(steps):
        n_blocks = -(-st.seq // g)
        table[j, :n_blocks] = torch.tensor(st.blocks[:n_blocks], dtype=torch.int32)
    return table


def _causal_placeholder(q, span_k, span_v, scale, out, rows, softcap=None) -> None:
    n_q = rows.stop - rows.start
    pos = torch.arange(n_q, device=q.device)
    o, _ = partial_attention(q[rows], span_k, span_v, scale, pos[None, :] <= pos[:, None], softcap)
    out[rows] = o.to(out.dtype)


def _read_raw(layout: PageLayout, keep_first_tile: bool, pages, staging, steps: list[SeqStep], spans, q, k, v,
              scale: float, out, softcap: float | None = None, ids: _BlockIds | None = None) -> None:
    """Prefill as serving engines read it: each chunk attends causally over what the cache held
    before it — the fp16 first tile, the tiles completed earlier (dequantized once per chunk by the
    ``dequant`` op, straight into the attention dtype: a paged read per 4-token row block re-read
    the whole past for every block) and the open tail —
    followed by the step's own raw keys/values. All chunks of the step go to one
    ``varlen_attention`` (vLLM's FlashAttention on a GPU: one launch, GQA, no merge)."""
    g = layout.tile
    ids = ids or _BlockIds(steps, None, pages.device)
    cast = q.dtype if q.is_cuda else torch.float32  # FlashAttention's operand dtype; exact on the CPU
    q_parts, k_parts, v_parts, row_spans, cu_q, cu_k = [], [], [], [], [0], [0]
    for i, st in enumerate(steps):
        rows = slice(st.q_start, st.q_end)
        if st.dummy:
            _causal_placeholder(q, *spans[i], scale, out, rows, softcap)
            continue
        if st.q_end <= st.q_start:
            continue
        t_c, n_old = st.ctx // g, st.ctx - (st.ctx // g) * g
        first_fp16 = keep_first_tile and t_c >= 1 and st.first_slot is not None
        page_start = 1 if (keep_first_tile and (t_c == 0 or st.first_slot is not None)) else 0
        keys, vals = [], []  # [n, H, D] pieces in token order: the past (st.ctx tokens), then the chunk
        if first_fp16:
            keys.append(staging[st.first_slot, 0].transpose(0, 1))
            vals.append(staging[st.first_slot, 1].transpose(0, 1))
        if t_c > page_start:
            kq, vq = dequant_tiles(layout, pages, ids(st, page_start, t_c), cast)  # [n, H, D], model basis
            keys.append(kq)
            vals.append(vq)
        if n_old:
            keys.append(spans[i][0][:, :n_old].transpose(0, 1))
            vals.append(spans[i][1][:, :n_old].transpose(0, 1))
        keys.append(k[rows])
        vals.append(v[rows])
        k_parts += [x.to(cast) for x in keys]
        v_parts += [x.to(cast) for x in vals]
        q_parts.append(q[rows])
        row_spans.append(rows)
        cu_q.append(cu_q[-1] + st.q_end - st.q_start)
        cu_k.append(cu_k[-1] + st.seq)
    if not q_parts:
        return
    one = len(row_spans) == 1 and out.is_contiguous()
    dst = out[row_spans[0]] if one else None
    o = varlen_attention(torch.cat(q_parts), torch.cat(k_parts), torch.cat(v_parts), cu_q, cu_k, scale, softcap,
                         out=dst if dst is not None and dst.dtype == cast else None)
    if o is dst:
        return
    for j, rows in enumerate(row_spans):
        out[rows] = o[cu_q[j]:cu_q[j + 1]].to(out.dtype)


def _read_tiled(layout: PageLayout, keep_first_tile: bool, pages, staging, steps: list[SeqStep], spans, q, k, v,
                scale: float, out, softcap: float | None = None) -> None:
    """Any rows, read as the reference defines (per sequence in Python: prefill chunks are few per step).

    ``paged_attention`` reads, for every query, the completed tiles below its own from the pages
    (tiles completed in this step included, so queries of a later tile read them quantized); the
    fp16 part (first tile, the query's own tile) is attended here and merged by log-sum-exp.
    """
    g = layout.tile
    dev = q.device
    # the quantized part: every query row over its sequence's pages
    live = [st for st in steps if not st.dummy and st.q_end > st.q_start]
    if live:
        q_seq, q_tile, page_start = [], [], []
        for j, st in enumerate(live):
            q_seq.extend([j] * (st.q_end - st.q_start))
            q_tile.extend(p // g for p in range(st.ctx, st.seq))
            first_fp16 = keep_first_tile and (st.ctx // g == 0 or st.first_slot is not None)
            page_start.append(1 if first_fp16 else 0)
        rows = torch.cat([torch.arange(st.q_start, st.q_end) for st in live]).to(dev)
        o_q, lse_q = paged_attention(layout, pages, q[rows], torch.tensor(q_seq, device=dev),
                                     torch.tensor(q_tile, dtype=torch.int32, device=dev),
                                     torch.tensor(page_start, dtype=torch.int32, device=dev),
                                     _block_table(live, g).to(dev), scale, softcap)
    at = 0
    for i, st in enumerate(steps):  # the fp16 part, merged with the quantized part
        rows = slice(st.q_start, st.q_end)
        n_q = st.q_end - st.q_start
        span_k, span_v = spans[i]
        if st.dummy:
            _causal_placeholder(q, span_k, span_v, scale, out, rows, softcap)
            continue
        t_c = st.ctx // g
        first_fp16 = keep_first_tile and (t_c == 0 or st.first_slot is not None)
        k_pos = torch.arange(t_c * g, st.seq, device=dev)
        keys, vals = span_k, span_v
        if first_fp16 and t_c >= 1:
            keys = torch.cat([staging[st.first_slot, 0], keys], 1)
            vals = torch.cat([staging[st.first_slot, 1], vals], 1)
            k_pos = torch.cat([torch.arange(g, device=dev), k_pos])
        q_pos = torch.arange(st.ctx, st.seq, device=dev)
        own = (k_pos[None, :] // g == q_pos[:, None] // g) & (k_pos[None, :] <= q_pos[:, None])
        first = (k_pos[None, :] < g) & (q_pos[:, None] >= g) if first_fp16 else torch.zeros_like(own)
        o16, lse16 = partial_attention(q[rows], keys, vals, scale, own | first, softcap)
        o, _ = merge(o_q[at:at + n_q], lse_q[at:at + n_q], o16, lse16)
        at += n_q
        out[rows] = o.to(out.dtype)
