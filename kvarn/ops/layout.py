"""The page layout: the one owner of how a layer's encoded tile sits in a page (block) of bytes.

One block holds one completed tile of G tokens of one layer, all KV heads: a *record* of
``PageLayout.nbytes`` bytes (``kvarn.quant.formats.tile_bytes``: capacity math has one source).
K heads come first, then V heads, head by head; a head's segment is

    codes [G, D*b/8] uint8 | scale | zero | norm           (fp16 fields, 2-byte aligned)

* codes: token-major, each token's D codes packed as ``kvarn.quant.pack`` says (1/2/4/8 bits: a
  little-endian stream, ``8/b`` codes per byte; 3 bits: a 2-bit plane then a 1-bit plane, so every
  field a kernel extracts is byte-aligned). fp16 heads store the values as fp16 ``[G, D]`` (2GD
  bytes), fp8 heads as float8 e4m3 ``[G, D]``; neither has scale/zero/norm.
* K (per-channel RTN): scale [D], zero [D]; with ``normalize="tile"`` a per-token multiplier norm [G].
* V (per-token RTN): scale [G], zero [G]; with ``normalize="tile"`` a per-channel norm [D]
  (``"static"``: the recipe's per-channel std, held by the layout, nothing per tile).

A value is read as ``(code * scale + zero) * norm`` in the rotated basis (Hadamard along D) when the
format rotates. ``kernel_tables(device)`` gives kernels the same description as device tensors,
built once per device: per-head byte offsets of each field, and the heads grouped by their
(K format, V format) so that a kernel specialised for one pair serves a group in one launch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..errors import KvarnError
from ..quant.codec import EncodedTiles, decode_tiles, encode_tiles
from ..quant.formats import FP16_BITS, LayerFormat, TensorFormat, head_tile_bytes, tile_bytes

FIELDS = ("codes", "scale", "zero", "norm")  # column order of ``KernelTables.offsets``
NO_FIELD = -1


def check_storable(fmt: LayerFormat, where: str) -> None:
    """Raise a one-line KvarnError unless every head of ``fmt`` has a stored form."""
    for kind, tf in (("K", fmt.k), ("V", fmt.v)):
        if tf.codec in ("rtn-sym", "lloyd-max", "rtn-tq") and any(b != FP16_BITS for b in tf.bits):
            raise KvarnError(f"{where}: {kind} codec {tf.codec!r} is an evaluation baseline with no stored form; "
                             "use a kvarn recipe or preset (codec 'rtn')")


def head_fields(tf: TensorFormat, bits: int, tile: int, head_dim: int) -> tuple:
    """``((name, nbytes), ...)`` of one head's segment, in stored order."""
    g, d = tile, head_dim
    if bits == FP16_BITS:
        return (("codes", g * d * 2),)
    if tf.codec == "fp8":
        return (("codes", g * d),)
    params = d * 2 if tf.axis == "channel" else g * 2
    out = [("codes", g * d * bits // 8), ("scale", params), ("zero", params)]
    if tf.normalize == "tile":
        out.append(("norm", g * 2 if tf.axis == "channel" else d * 2))
    return tuple(out)


@dataclass(frozen=True)
class StoredForm:
    """How one head's K or V sits in a page: raw fp16, raw fp8, or RTN codes with scales; and
    whether its values are in the rotated (Hadamard) basis."""

    fp8: bool
    scaled: bool
    rotated: bool


def stored_form(tf: TensorFormat, bits: int) -> StoredForm:
    fp8 = tf.codec == "fp8" and bits != FP16_BITS
    scaled = bits != FP16_BITS and not fp8
    return StoredForm(fp8, scaled, tf.hadamard and scaled)


@dataclass(frozen=True)
class HeadGroup:
    """KV heads of one layer whose K and V are stored alike (one kernel specialisation)."""

    k_bits: int
    v_bits: int
    heads: torch.Tensor  # int32 [n] on the tables' device


@dataclass(frozen=True)
class KernelTables:
    """The layout as a kernel reads it (device tensors, built once per device).

    offsets: int32 ``[2, H, 4]`` byte offsets in a record of (codes, scale, zero, norm) for K (0)
    and V (1); ``NO_FIELD`` where a head has no such field. v_static: float32 ``[H, D]`` per-channel
    V multiplier for ``normalize="static"`` (None otherwise). hadamard: rotation matrix ``[D, D]``
    float32 (None when neither K nor V rotates). v_rotated: int64 indices of the KV heads whose V
    is stored rotated (their attention output comes out of the paged kernel in the rotated basis),
    None when no head's is; v_rotated_all: every head's is (no indexing needed).
    """

    offsets: torch.Tensor
    groups: tuple
    v_static: torch.Tensor | None
    hadamard: torch.Tensor | None
    v_rotated: torch.Tensor | None = None
    v_rotated_all: bool = False


class PageLayout:
    """Byte layout of one layer's page (see the module docstring) and its reference codec.

    ``k_log_std``/``v_log_std``: ``[H, D]`` recipe priors or None.
    """

    def __init__(self, fmt: LayerFormat, k_log_std: torch.Tensor | None, v_log_std: torch.Tensor | None):
        check_storable(fmt, "layer format")
        self.fmt = fmt
        self.tile, self.head_dim, self.num_kv_heads = fmt.tile, fmt.head_dim, fmt.num_kv_heads
        self.priors = {"k": k_log_std, "v": v_log_std}
        self._on_device: dict = {}  # (kind, device) -> the prior there
        self.formats = {"k": fmt.k, "v": fmt.v}
        self.fields: dict[tuple[str, int], dict[str, tuple[int, int]]] = {}  # (kind, head) -> name -> (offset, nbytes)
        off = 0
        for kind, tf in self.formats.items():
            for h, b in enumerate(tf.bits):
                seg = {}
                for name, nb in head_fields(tf, b, self.tile, self.head_dim):
                    seg[name] = (off, nb)
                    off += nb
                if off - min(o for o, _ in seg.values()) != head_tile_bytes(tf, b, self.tile, self.head_dim):
                    raise AssertionError(f"{kind} head {h}: segment fields disagree with formats.head_tile_bytes")
                self.fields[kind, h] = seg
        self.nbytes = off
        for (kind, h), seg in self.fields.items():  # kernels rely on it for 16-byte loads
            for name, (o, _) in seg.items():
                if o % 16:
                    raise AssertionError(f"{kind} head {h} field {name} starts at byte {o}, not a multiple of 16")
        if off != tile_bytes(fmt):  # the capacity math and the layout must agree byte for byte
            raise AssertionError(f"layout has {off} bytes per tile, formats.tile_bytes says {tile_bytes(fmt)}")

    # -- what kernels read -------------------------------------------------------------------------
    def offsets(self) -> torch.Tensor:
        """int32 ``[2, H, 4]``: see ``KernelTables.offsets``."""
        t = torch.full((2, self.num_kv_heads, len(FIELDS)), NO_FIELD, dtype=torch.int32)
        for (kind, h), seg in self.fields.items():
            for name, (o, _) in seg.items():
                t["kv".index(kind), h, FIELDS.index(name)] = o
        return t

    def kernel_tables(self, device) -> KernelTables:
        return _tables(self, torch.device(device))

    def head_groups(self) -> list[tuple[int, int, list[int]]]:
        """``(k_bits, v_bits, heads)`` for every distinct pair of widths, heads in order."""
        pairs: dict[tuple[int, int], list[int]] = {}
        for h, (kb, vb) in enumerate(zip(self.fmt.k.bits, self.fmt.v.bits)):
            pairs.setdefault((kb, vb), []).append(h)
        return [(kb, vb, hs) for (kb, vb), hs in sorted(pairs.items())]

    # -- reference codec (PyTorch) -----------------------------------------------------------------
    def _prior(self, kind: str, heads: list[int], device) -> torch.Tensor | None:
        p = self.priors[kind]
        if p is None:
            return None
        device = torch.device(device)
        if p.device != device:  # recipe priors live on the host: copied once per device, not per call
            if (kind, device) not in self._on_device:
                self._on_device[kind, device] = p.to(device)
            p = self._on_device[kind, device]
        return p[_head_index(heads, device)][:, None, :]  # [h, 1, D]

    def _by_bits(self, kind: str) -> list[tuple[int, list[int]]]:
        bits = self.formats[kind].bits
        return [(b, [h for h, hb in enumerate(bits) if hb == b]) for b in sorted(set(bits))]

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Records ``[n, nbytes]`` uint8 of ``n`` tiles; ``k``, ``v``: ``[H, n, G, D]`` float."""
        n = k.shape[1]
        rec = torch.empty(n, self.nbytes, dtype=torch.uint8, device=k.device)
        for kind, x_all in (("k", k), ("v", v)):
            tf = self.formats[kind]
            for bits, heads in self._by_bits(kind):
                enc = encode_tiles(x_all[heads], tf, bits, self._prior(kind, heads, k.device))
                parts = {"codes": enc.codes, "scale": enc.scale, "zero": enc.zero, "norm": enc.norm}
                for i, h in enumerate(heads):
                    for name, (o, nb) in self.fields[kind, h].items():
                        rec[:, o:o + nb] = parts[name][i].contiguous().view(torch.uint8).reshape(n, nb)
        return rec

    def decode(self, rec: torch.Tensor, rotated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)`` float32 ``[H, n, G, D]`` from records ``[n, >= nbytes]`` uint8.

        ``rotated=True`` leaves heads whose format rotates in the rotated basis (what a kernel
        multiplies with a rotated query); the default returns the model's basis.
        """
        n, g, d = rec.shape[0], self.tile, self.head_dim
        out = {kind: torch.empty(self.num_kv_heads, n, g, d, dtype=torch.float32, device=rec.device) for kind in "kv"}
        for kind in "kv":
            tf = self.formats[kind]
            read_fmt = TensorFormat(tf.bits, tf.axis, tf.normalize, tf.hadamard and not rotated, tf.clip, tf.codec)
            for bits, heads in self._by_bits(kind):
                parts = {name: torch.stack([rec[:, o:o + nb] for o, nb in
                                            [self.fields[kind, h][name] for h in heads]]).contiguous()
                         for name in self.fields[kind, heads[0]]}
                h = len(heads)
                if bits == FP16_BITS or tf.codec == "fp8":
                    dtype = torch.float16 if bits == FP16_BITS else torch.float8_e4m3fn
                    enc = EncodedTiles(bits, parts["codes"].view(dtype).reshape(h, n, g, d))
                else:
                    channel = tf.axis == "channel"
                    pshape = (h, n, 1, d) if channel else (h, n, g, 1)
                    nshape = (h, n, g, 1) if channel else (h, n, 1, d)
                    f16 = lambda name, shape: parts[name].view(torch.float16).reshape(shape)  # noqa: E731
                    enc = EncodedTiles(bits, parts["codes"].reshape(h, n, g, d * bits // 8), f16("scale", pshape),
                                       f16("zero", pshape), f16("norm", nshape) if "norm" in parts else None)
                out[kind][_head_index(heads, rec.device)] = decode_tiles(enc, read_fmt, d,
                                                                         self._prior(kind, heads, rec.device))
        return out["k"], out["v"]


def _head_index(heads: list[int], device) -> slice | torch.Tensor:
    """``heads`` as an index a device tensor takes without a host→device copy: a slice where they
    are consecutive, else a cached device tensor (a Python list index is copied from pageable memory
    on every use, which waits for the GPU: two device syncs per layer in the H200 prefill profile)."""
    if heads == list(range(heads[0], heads[-1] + 1)):
        return slice(heads[0], heads[-1] + 1)
    return _index_tensor(tuple(heads), torch.device(device))


@functools.lru_cache(maxsize=256)
def _index_tensor(heads: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(heads, dtype=torch.long, device=device)


@functools.lru_cache(maxsize=256)
def _tables(layout: PageLayout, device: torch.device) -> KernelTables:
    from ..quant.hadamard import hadamard_matrix

    groups = tuple(HeadGroup(kb, vb, torch.tensor(hs, dtype=torch.int32, device=device))
                   for kb, vb, hs in layout.head_groups())
    v_static = None
    if layout.fmt.v.normalize == "static":
        if layout.priors["v"] is None:
            raise KvarnError("V normalize='static' needs the recipe's per-channel log-std prior")
        v_static = torch.exp(layout.priors["v"].float()).to(device).contiguous()
    rotates = layout.fmt.k.hadamard or layout.fmt.v.hadamard
    had = hadamard_matrix(layout.head_dim, torch.float32, device) if rotates else None
    v_rot = [h for h in range(layout.num_kv_heads) if stored_form(layout.fmt.v, layout.fmt.v.bits[h]).rotated]
    return KernelTables(layout.offsets().to(device), groups, v_static, had,
                        torch.tensor(v_rot, dtype=torch.int64, device=device) if v_rot else None,
                        len(v_rot) == layout.num_kv_heads)
