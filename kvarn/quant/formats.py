"""Storage formats and the one bytes-per-token function all capacity math comes from.

A layer's cache is described by a ``LayerFormat``: tile size G, head_dim D and one
``TensorFormat`` for keys and one for values. A ``TensorFormat`` gives per KV head the code width
(``bits``: 1/2/3/4/8 = RTN codes, 16 = stored as fp16) and how groups and scales are laid out:

* ``axis="channel"`` (keys): one fp16 (scale, zero) pair per channel per tile — KIVI/KVarN keys.
* ``axis="token"`` (values): one fp16 (scale, zero) pair per token.
* ``normalize="tile"``: KVarN's per-tile variance normalization; the scale that the RTN groups
  cannot absorb is stored in fp16 — a per-token scale for channel-axis tensors, a per-channel scale
  for token-axis tensors. ``"static"`` (token axis only) uses the recipe's calibrated per-channel
  scale instead, which costs nothing per token. ``"none"``: no normalization.
* ``codec="fp8"``: float8 e4m3 cast, no scales; ``codec="rtn-sym"``: symmetric absmax RTN with
  one fp16 scale per group (both baselines only: no encoder/packer for them).
* vLLM's TurboQuant (``kvarn.quant.turboquant``, baselines only, ``axis="token"``, tile 1):
  ``codec="lloyd-max"`` keys — Hadamard-rotated unit vector, per-coordinate Lloyd-Max codes and
  one fp16 norm per token; ``codec="rtn-tq"`` values — per-token min/max codes with an fp16
  scale and zero (kvarn's per-token RTN layout, vLLM's rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import KvarnError
from .rtn import SUPPORTED_BITS

FP16_BITS = 16
ALL_BITS = SUPPORTED_BITS + (FP16_BITS,)
SUPPORTED_TILES = (64, 128)
AXES = ("channel", "token")
NORMALIZE = ("none", "tile", "static")
CODECS = ("rtn", "rtn-sym", "fp8", "lloyd-max", "rtn-tq")
_FP16_BYTES = 2
# The range of a calibrated per-channel log-std prior: the std of fp16 activations the runtime can
# divide by, from fp16's smallest normal to its largest finite number (the per-tile normalization
# multipliers are clamped to the same range). Calibration clamps into it; recipes outside it are refused.
LOG_STD_MIN = math.log(2.0**-14)
LOG_STD_MAX = math.log(65504.0)


@dataclass(frozen=True)
class TensorFormat:
    """How K or V of one layer is stored; ``bits`` has one entry per KV head."""

    bits: tuple[int, ...]
    axis: str = "channel"
    normalize: str = "none"
    hadamard: bool = True
    clip: bool = False
    codec: str = "rtn"

    def __post_init__(self):
        if self.axis not in AXES:
            raise KvarnError(f"axis has to be one of {list(AXES)} but got {self.axis!r}")
        if self.normalize not in NORMALIZE:
            raise KvarnError(f"normalize has to be one of {list(NORMALIZE)} but got {self.normalize!r}")
        if self.normalize == "static" and self.axis != "token":
            raise KvarnError("normalize='static' needs axis='token': per-channel RTN already absorbs a static channel scale")
        if self.codec not in CODECS:
            raise KvarnError(f"codec has to be one of {list(CODECS)} but got {self.codec!r}")
        bad = [b for b in self.bits if b not in ALL_BITS]
        if bad:
            raise KvarnError(f"bits has to be one of {list(ALL_BITS)} but got {bad[0]}")

    def with_bits(self, bits) -> "TensorFormat":
        return TensorFormat(tuple(int(b) for b in bits), self.axis, self.normalize, self.hadamard, self.clip, self.codec)

    def options(self) -> dict:
        """Everything but the bits, for recipe metadata."""
        return {"axis": self.axis, "normalize": self.normalize, "hadamard": self.hadamard, "clip": self.clip, "codec": self.codec}


@dataclass(frozen=True)
class LayerFormat:
    head_dim: int
    tile: int
    k: TensorFormat
    v: TensorFormat

    def __post_init__(self):
        if len(self.k.bits) != len(self.v.bits):
            raise KvarnError(f"K has {len(self.k.bits)} heads of bits but V has {len(self.v.bits)}")

    @property
    def num_kv_heads(self) -> int:
        return len(self.k.bits)


def head_tile_bytes(fmt: TensorFormat, bits: int, tile: int, head_dim: int) -> int:
    """Bytes one KV head's tile of ``tile`` tokens takes for K or V (codes + scales)."""
    g, d = tile, head_dim
    if bits == FP16_BITS:
        return g * d * _FP16_BYTES
    if fmt.codec == "fp8":
        return g * d
    if (g * d * bits) % 8 or (d * bits) % 8:
        raise KvarnError(f"{bits}-bit codes of head_dim {d} do not fill whole bytes per token")
    codes = g * d * bits // 8
    n_params = 1 if fmt.codec in ("rtn-sym", "lloyd-max") else 2  # lloyd-max: the norm
    if fmt.axis == "channel":
        params = d * n_params * _FP16_BYTES
        norm = g * _FP16_BYTES if fmt.normalize == "tile" else 0
    else:
        params = g * n_params * _FP16_BYTES
        norm = d * _FP16_BYTES if fmt.normalize == "tile" else 0
    return codes + params + norm


def tile_bytes(layer: LayerFormat) -> int:
    """Bytes one tile (all KV heads, K and V) of a layer takes: the page unit of a runtime."""
    return sum(
        head_tile_bytes(fmt, b, layer.tile, layer.head_dim)
        for fmt in (layer.k, layer.v)
        for b in fmt.bits
    )


def bytes_per_token(layer: LayerFormat) -> float:
    """Bytes per cached token of one layer in steady state (quantized tiles, scales included).

    The only source of capacity numbers in kvarn: bits/element, compression and page sizes all
    derive from it. fp16 tokens kept per sequence (first tile, open tail) are counted separately by
    ``fp16_tokens_per_sequence``.
    """
    return tile_bytes(layer) / layer.tile


def fp16_bytes_per_token(num_kv_heads: int, head_dim: int) -> int:
    return 2 * num_kv_heads * head_dim * _FP16_BYTES


def bits_per_element(layers: list[LayerFormat]) -> float:
    """Average stored bits per K/V element over layers, scales included."""
    total_bytes = sum(bytes_per_token(l) for l in layers)
    elements = sum(2 * l.num_kv_heads * l.head_dim for l in layers)
    return 8.0 * total_bytes / elements


def fp16_tokens_per_sequence(tile: int, keep_first_tile: bool) -> int:
    """Worst-case tokens a sequence keeps in fp16: the first tile (if kept) plus an open tail."""
    if tile == 1:
        return 0
    return (tile if keep_first_tile else 0) + tile - 1
