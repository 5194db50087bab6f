"""Encode/decode tiles of one KV head, and the fake-quantized view of a whole sequence.

``encode_tiles`` → ``EncodedTiles`` is what a runtime stores; ``decode_tiles`` is what it reads.
``fake_quantize_sequence`` applies encode+decode to every completed tile of a sequence and is what
calibration and evaluation use (it skips the bit packing, which ``pack_bits``/``unpack_bits`` make
lossless, so results are identical to a packed round trip; tests check this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import FP16_BITS, TensorFormat
from .hadamard import rotate
from .normalize import variance_normalize
from .pack import pack_bits, unpack_bits
from .rtn import dequantize_rtn, fake_quantize_rtn, fake_quantize_symmetric, quantize_rtn

NORMALIZE_ITERS = 8


@dataclass
class EncodedTiles:
    """Tiles ``[..., G, D]`` of one head in stored form.

    codes: uint8 ``[..., G, D*bits/8]`` (token-major, each token's D codes packed, see ``pack``),
    or fp16 ``[..., G, D]`` when bits == 16 / the raw float8 bytes for fp8.
    scale, zero: fp16 ``[..., 1, D]`` (channel axis) or ``[..., G, 1]`` (token axis); None for fp16/fp8.
    norm: fp16 multiplier ``[..., G, 1]`` (channel axis) or ``[..., 1, D]`` (token axis) for
    ``normalize="tile"``, else None.
    """

    bits: int
    codes: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    norm: torch.Tensor | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero, self.norm) if t is not None)


def _static_scale(log_std: torch.Tensor | None, d: int, device) -> torch.Tensor:
    if log_std is None:
        raise ValueError("normalize='static' needs the recipe's per-channel log-std prior")
    return torch.exp(log_std.float()).to(device).reshape(*log_std.shape[:-1], 1, d)


def _group_dim(fmt: TensorFormat) -> int:
    """RTN groups reduce over tokens (per-channel keys) or over channels (per-token values)."""
    return -2 if fmt.axis == "channel" else -1


def _multiplier(x, fmt: TensorFormat, log_std, iters):
    """The fp16-exact scale (broadcastable to rotated tiles ``x [..., G, D]``) that normalization
    divides by and the reader multiplies back, or None (per tile from ``x``, or static from the prior)."""
    d = x.shape[-1]
    if fmt.normalize == "tile":
        prior = None if log_std is None else log_std.float().reshape(*log_std.shape[:-1], 1, d)
        log_r, log_c = variance_normalize(x, iters, prior)
        stored = log_r if fmt.axis == "channel" else log_c
        return torch.exp(stored).clamp(6.2e-5, 65504.0).half().float()
    if fmt.normalize == "static":
        return _static_scale(log_std, d, x.device)
    return None


def _rotate_and_normalize(x, fmt: TensorFormat, log_std, iters):
    """The encoder's common front: rotate, then divide by the normalization multiplier.

    Returns ``(x / mult, mult)`` where ``mult`` (fp16-exact float32, broadcastable to x) is the
    per-token (channel axis) or per-channel (token axis) scale the reader multiplies back, or None.
    """
    if fmt.hadamard:
        x = rotate(x)
    mult = _multiplier(x, fmt, log_std, iters)
    return (x if mult is None else x / mult), mult


def encode_tiles(
    x: torch.Tensor, fmt: TensorFormat, bits: int, log_std: torch.Tensor | None = None,
    iters: int = NORMALIZE_ITERS,
) -> EncodedTiles:
    """Quantize tiles ``x [..., G, D]`` of one KV head (or several heads sharing ``bits``).

    ``log_std`` (broadcastable to ``[..., D]``): calibrated per-channel log-std after rotation,
    the start of the normalization (``"tile"``) or the fixed channel scale (``"static"``).
    """
    x = x.float()
    if bits == FP16_BITS:
        return EncodedTiles(bits, x.half())
    if fmt.codec == "fp8":
        return EncodedTiles(bits, x.to(torch.float8_e4m3fn))
    if fmt.codec != "rtn":
        raise ValueError(f"codec {fmt.codec!r} is a baseline for evaluation; it has no stored form")
    x, mult = _rotate_and_normalize(x, fmt, log_std, iters)
    norm = mult.half() if fmt.normalize == "tile" else None  # "static" lives in the recipe
    codes, scale, zero = quantize_rtn(x, bits, dim=_group_dim(fmt), clip=fmt.clip)
    return EncodedTiles(bits, pack_bits(codes, bits), scale.half(), zero.half(), norm)


def decode_tiles(
    enc: EncodedTiles, fmt: TensorFormat, head_dim: int, log_std: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantize to float32 ``[..., G, D]`` in the model's (unrotated) basis."""
    if enc.bits == FP16_BITS or fmt.codec == "fp8":
        return enc.codes.float()
    codes = unpack_bits(enc.codes, enc.bits, head_dim)
    x = dequantize_rtn(codes, enc.scale.float(), enc.zero.float())
    if enc.norm is not None:
        x = x * enc.norm.float()
    elif fmt.normalize == "static":
        x = x * _static_scale(log_std, head_dim, x.device)
    return rotate(x) if fmt.hadamard else x


# On the CPU, tiles are fake-quantized in chunks of about this many elements (1 MiB of float32), so
# that the clip search and the normalization (~100 passes each) work in cache; measured 2-3x faster
# at 4k. Not on a GPU: there every pass is a kernel launch per chunk, and launches were the cost
# (H200, Llama-3.1-8B shape: ~6.5 s per 2048-token calibration window with CPU-sized chunks).
_CHUNK_ELEMENTS = 1 << 18


def _fake_quantize_rotated(x, fmt: TensorFormat, bits: int, log_std, iters) -> torch.Tensor:
    """Normalize, RTN round trip and un-normalize of rotated tiles ``x [..., G, D]`` (float32)."""
    mult = _multiplier(x, fmt, log_std, iters)
    y = fake_quantize_rtn(x if mult is None else x / mult, bits, _group_dim(fmt), fmt.clip)
    return y if mult is None else y.mul_(mult)


def fake_quantize_tiles(
    x: torch.Tensor, fmt: TensorFormat, bits: int, log_std: torch.Tensor | None = None,
    iters: int = NORMALIZE_ITERS,
) -> torch.Tensor:
    """``decode(encode(x))`` without packing: float32 ``[..., G, D]``.

    Tiles are independent, so on the CPU they are processed a few at a time along dim -3 when ``log_std``
    (``[..., D]`` against x's ``[..., G, D]``) broadcasts over it, as per-head priors ``[1, H, 1, D]``
    do; the result is the same as one call over all of them.
    """
    x = x.float()
    if bits == FP16_BITS:
        return x.half().float()
    if fmt.codec == "fp8":
        return x.to(torch.float8_e4m3fn).float()
    if fmt.codec == "rtn-sym":
        return fake_quantize_symmetric(x, bits, _group_dim(fmt))
    if fmt.codec in ("lloyd-max", "rtn-tq"):
        from . import turboquant

        if fmt.axis != "token":
            raise ValueError(f"codec {fmt.codec!r} quantizes tokens: it needs axis='token'")
        return (turboquant.fake_quantize_keys if fmt.codec == "lloyd-max" else turboquant.fake_quantize_values)(x, bits)
    if fmt.hadamard:
        x = rotate(x)
    if x.dim() < 3 or x.device.type != "cpu" or (
            log_std is not None and log_std.dim() >= 2 and log_std.shape[-2] != 1):
        out = _fake_quantize_rotated(x, fmt, bits, log_std, iters)
    else:
        n = x.shape[-3]
        step = max(1, _CHUNK_ELEMENTS // x[..., 0, :, :].numel())
        out = torch.empty_like(x)
        for i in range(0, n, step):
            out[..., i:i + step, :, :] = _fake_quantize_rotated(x[..., i:i + step, :, :], fmt, bits, log_std, iters)
    return rotate(out) if fmt.hadamard else out


def quantized_span(seq_len: int, tile: int, keep_first_tile: bool) -> tuple[int, int]:
    """Token range ``[start, end)`` of the *completed* tiles a runtime holds quantized."""
    if tile == 1:
        return 0, seq_len
    start = tile if keep_first_tile else 0
    n = max(0, (seq_len - start) // tile)
    return start, start + n * tile


def fake_quantize_sequence(
    x: torch.Tensor, fmt: TensorFormat, tile: int, keep_first_tile: bool,
    log_std: torch.Tensor | None = None, iters: int = NORMALIZE_ITERS,
) -> torch.Tensor:
    """What a runtime would read back for ``x [B, H, T, D]`` once all complete tiles are stored.

    Completed tiles (after the first, if kept) are quantized per head with ``fmt.bits[h]``; the
    first tile and the open tail come back fp16-rounded. ``log_std``: ``[H, D]`` or None.
    With ``tile == 1`` every token is quantized on write (per-token baselines).
    """
    b, h, t, d = x.shape
    out = x.float().half().float()
    start, end = quantized_span(t, tile, keep_first_tile)
    if end <= start:
        return out
    g = 1 if tile == 1 else tile
    seg = x[:, :, start:end].float().reshape(b, h, (end - start) // g, g, d)
    if log_std is not None:
        log_std = log_std.to(x.device)
    if tile == 1 and fmt.axis == "channel":
        raise ValueError("per-channel groups need tiles of more than one token")
    h0 = 0
    while h0 < h:  # runs of consecutive heads with one width: slices, not gathered copies
        bw = fmt.bits[h0]
        h1 = h0 + 1
        while h1 < h and fmt.bits[h1] == bw:
            h1 += 1
        prior = None if log_std is None else log_std[h0:h1][None, :, None, :]
        q = fake_quantize_tiles(seg[:, h0:h1], fmt, bw, prior, iters)
        out[:, h0:h1, start:end] = q.reshape(b, h1 - h0, end - start, d)
        h0 = h1
    return out
