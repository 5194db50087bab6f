"""The eval reader and fake quantizer before issue 11, kept as references the fast ones are tested against.

``scheme_attention_ref`` is what ``SchemeAttention.attend`` computed until the tile-by-tile reader
replaced it: fake-quantize the whole sequence, then one SDPA call over every key twice (quantized,
then exact) with a ``[Tq, 2 Tk]`` mask choosing one copy per (query, key) — the reading rule spelled
out as a mask. Slow (the doubled keys and the mask cost ~4x a plain pass at 4k tokens), exact.

``fake_quantize_sequence_ref`` is the fake quantizer as it was: one full-size temporary per
operation, the whole sequence at once, heads gathered by width. The current one (scratch tensors
reused in place, tiles in cache-sized chunks, heads as slices) must give bit-identical results.
"""

from __future__ import annotations

import torch

from .attention import mixed_attention, quantized_read_mask
from .codec import _group_dim, _static_scale, fake_quantize_sequence, quantized_span
from .formats import FP16_BITS
from .hadamard import rotate
from .normalize import _EPS, _std, imbalance
from .rtn import CLIP_RATIOS, SUPPORTED_BITS, _codes, _params, dequantize_rtn, fake_quantize_symmetric


def scheme_attention_ref(scheme, layer_idx: int, q, k, v, bias, scaling) -> torch.Tensor:
    """Attention ``[B, Hq, Tq, D]`` of one layer read as ``scheme`` (a ``CacheScheme`` or None) stores it."""
    k16, v16 = k.float().half().float(), v.float().half().float()
    if scheme is None:
        return mixed_attention(q, k16, v16, None, None, None, bias, scaling)
    fmt = scheme.layers[layer_idx]
    kp = None if scheme.k_log_std is None else scheme.k_log_std[layer_idx]
    vp = None if scheme.v_log_std is None else scheme.v_log_std[layer_idx]
    k_hat = fake_quantize_sequence(k16, fmt.k, fmt.tile, scheme.keep_first_tile, kp, scheme.iters)
    v_hat = fake_quantize_sequence(v16, fmt.v, fmt.tile, scheme.keep_first_tile, vp, scheme.iters)
    t = k.shape[-2]
    pos = torch.arange(t, device=k.device)
    mask = quantized_read_mask(pos[t - q.shape[-2]:], pos, fmt.tile, scheme.keep_first_tile)
    return mixed_attention(q, k16, v16, k_hat, v_hat, mask, bias, scaling)


def quantize_rtn_ref(x, bits: int, dim: int, clip: bool = False):
    """``kvarn.quant.rtn.quantize_rtn`` before issue 11."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits has to be one of {list(SUPPORTED_BITS)} but got {bits}")
    x = x.float()
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    scale, zero = _params(lo, hi, bits)
    if clip:
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        best_err = None
        for ratio in CLIP_RATIOS:
            s, z = _params(mid - half * ratio, mid + half * ratio, bits)
            err = ((_codes(x, s, z, bits) * s + z - x) ** 2).sum(dim=dim, keepdim=True)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            scale = torch.where(better, s, scale)
            zero = torch.where(better, z, zero)
    return _codes(x, scale, zero, bits).to(torch.uint8), scale, zero


def variance_normalize_ref(x, iters: int = 8, log_col_prior=None):
    """``kvarn.quant.normalize.variance_normalize`` before issue 11."""
    x = x.float()
    log_r = torch.zeros(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    log_c = torch.zeros(*x.shape[:-2], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    if log_col_prior is not None:
        log_c = log_c + log_col_prior.to(device=x.device, dtype=x.dtype)
        log_r = torch.log(_std(x * torch.exp(-log_c), -1, keepdim=True) + _EPS)
    best_r, best_c = log_r, log_c
    best = imbalance(x * torch.exp(-log_r - log_c))
    for _ in range(iters):
        log_c = torch.log(_std(x * torch.exp(-log_r), -2, keepdim=True) + _EPS)
        log_r = torch.log(_std(x * torch.exp(-log_c), -1, keepdim=True) + _EPS)
        shift = log_c.mean(dim=-1, keepdim=True)
        log_c, log_r = log_c - shift, log_r + shift
        score = imbalance(x * torch.exp(-log_r - log_c))
        better = score < best
        best = torch.where(better, score, best)
        better = better[..., None, None]
        best_r = torch.where(better, log_r, best_r)
        best_c = torch.where(better, log_c, best_c)
    return best_r, best_c


def _fake_quantize_tiles_ref(x, fmt, bits, log_std, iters):
    x = x.float()
    if bits == FP16_BITS:
        return x.half().float()
    if fmt.codec == "fp8":
        return x.to(torch.float8_e4m3fn).float()
    if fmt.codec == "rtn-sym":
        return fake_quantize_symmetric(x, bits, _group_dim(fmt))
    d = x.shape[-1]
    if fmt.hadamard:
        x = rotate(x)
    mult = None
    if fmt.normalize == "tile":
        prior = None if log_std is None else log_std.float().reshape(*log_std.shape[:-1], 1, d)
        log_r, log_c = variance_normalize_ref(x, iters, prior)
        stored = log_r if fmt.axis == "channel" else log_c
        mult = torch.exp(stored).clamp(6.2e-5, 65504.0).half().float()
    elif fmt.normalize == "static":
        mult = _static_scale(log_std, d, x.device)
    if mult is not None:
        x = x / mult
    x = dequantize_rtn(*quantize_rtn_ref(x, bits, dim=_group_dim(fmt), clip=fmt.clip))
    if mult is not None:
        x = x * mult
    return rotate(x) if fmt.hadamard else x


def fake_quantize_sequence_ref(x, fmt, tile: int, keep_first_tile: bool, log_std=None, iters: int = 8):
    """``kvarn.quant.codec.fake_quantize_sequence`` before issue 11 (kvarn's own codecs)."""
    b, h, t, d = x.shape
    out = x.float().half().float()
    start, end = quantized_span(t, tile, keep_first_tile)
    if end <= start:
        return out
    g = 1 if tile == 1 else tile
    seg = x[:, :, start:end].float().reshape(b, h, (end - start) // g, g, d)
    bits = torch.tensor(fmt.bits)
    for bw in sorted(set(fmt.bits)):
        heads = torch.nonzero(bits == bw).flatten().tolist()
        prior = None if log_std is None else log_std[heads][None, :, None, :]
        q = _fake_quantize_tiles_ref(seg[:, heads], fmt, bw, prior, iters)
        out[:, heads, start:end] = q.reshape(b, len(heads), end - start, d)
    return out
