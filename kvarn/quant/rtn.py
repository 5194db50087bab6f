"""Asymmetric round-to-nearest (RTN) quantization with fp16 scale and zero-point.

For a group of values reduced along ``dim``: ``scale = (hi - lo) / (2**bits - 1)``, ``zero = lo``,
``code = round((x - zero) / scale)`` clamped to ``[0, 2**bits - 1]``, and
``x_hat = code * scale + zero``. Scale and zero are rounded to fp16 *before* the codes are
computed, so the codes are the ones a reader holding the stored fp16 parameters expects.

``clip=True`` searches a small grid of range shrink factors per group and keeps the one with the
lowest squared error (a free accuracy gain at 2-3 bits, where min/max ranges waste levels on the
tails of near-Gaussian rotated data). It changes only how the stored scale/zero are chosen, not the
format.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 8)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
# fp16's smallest normal; a scale below it would lose precision or flush to zero.
_MIN_SCALE = 6.2e-5
_MAX_SCALE = 65504.0


def _params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    levels = 2**bits - 1
    # saturate at fp16's largest finite number: a scale that rounds to inf turns every code into NaN
    scale = ((hi - lo) / levels).clamp(_MIN_SCALE, _MAX_SCALE).half().float()
    zero = lo.clamp(-65504.0, 65504.0).half().float()
    return scale, zero


def _codes(x, scale, zero, bits):
    return torch.round((x - zero) / scale).clamp_(0, 2**bits - 1)


def _search_params(x: torch.Tensor, bits: int, dim: int, clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored (scale, zero) of the groups of ``x`` (float32) reduced along ``dim``: min/max, or with
    ``clip`` the lowest-squared-error range among ``CLIP_RATIOS``. The search reuses one scratch
    tensor in place (a fresh full-size temporary per step costs more than the arithmetic on CPU);
    the operations and their order are those of the formula in the module docstring."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale, zero = _params(lo, hi, bits)
    if not clip:
        return scale, zero
    levels = 2**bits - 1
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    buf = torch.empty_like(x)
    best_err = None
    for ratio in CLIP_RATIOS:
        s, z = _params(mid - half * ratio, mid + half * ratio, bits)
        # ((round((x - z) / s).clamp(0, levels) * s + z - x) ** 2).sum(dim)
        torch.sub(x, z, out=buf).div_(s).round_().clamp_(0, levels).mul_(s).add_(z).sub_(x)
        err = buf.mul_(buf).sum(dim=dim, keepdim=True)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def quantize_rtn(
    x: torch.Tensor, bits: int, dim: int, clip: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``x`` in groups reduced along ``dim``.

    Returns ``codes`` (uint8, shape of x), ``scale`` and ``zero`` (float32 holding fp16-exact
    values, shape of x with ``dim`` reduced to 1).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits has to be one of {list(SUPPORTED_BITS)} but got {bits}")
    x = x.float()
    scale, zero = _search_params(x, bits, dim, clip)
    return _codes(x, scale, zero, bits).to(torch.uint8), scale, zero


def dequantize_rtn(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``codes * scale + zero`` in float32 (scale/zero broadcast over the reduced dim)."""
    return codes.float() * scale + zero


def fake_quantize_rtn(x: torch.Tensor, bits: int, dim: int, clip: bool = False) -> torch.Tensor:
    """``dequantize_rtn(*quantize_rtn(x, ...))`` — what a reader of the stored codes sees (computed
    without the uint8 round trip: the codes are small integers, exact in float32)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits has to be one of {list(SUPPORTED_BITS)} but got {bits}")
    x = x.float()
    scale, zero = _search_params(x, bits, dim, clip)
    return torch.sub(x, zero).div_(scale).round_().clamp_(0, 2**bits - 1).mul_(scale).add_(zero)


def fake_quantize_symmetric(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Symmetric absmax RTN (one fp16 scale per group, codes in ``[-(2**(b-1)-1), 2**(b-1)-1]``).

    Baselines only (e.g. int4 per token and head); kvarn's own formats are asymmetric.
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"symmetric bits has to be one of [2, 3, 4, 8] but got {bits}")
    x = x.float()
    qmax = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(dim=dim, keepdim=True) / qmax).clamp_min(_MIN_SCALE).half().float()
    return torch.round(x / scale).clamp_(-qmax, qmax) * scale
