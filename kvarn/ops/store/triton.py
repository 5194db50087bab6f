"""Triton store: encode completed tiles of one layer (all KV heads, K and V) into pages, one launch.

``store_tiles`` computes what ``reference.store_tiles`` computes (``PageLayout.encode`` →
``kvarn.quant.codec.encode_tiles``), in float32, op for op:

* one program per (tile, KV head, K/V): grid ``(n, H, 2)``. The program holds its head's whole
  ``[G, D]`` tile in registers.
* input read as fp16-rounded float32 (``x.float().half().float()``);
* Hadamard rotation ``x @ H`` as ``tl.dot(..., input_precision="ieee")`` (fp32 FMAs, no TF32),
  accumulated over ``BK``-column chunks of x read straight from the input (``H`` is never held whole);
* ``normalize="tile"``: ``variance_normalize`` (same iteration, same best-balanced choice, the
  layer's log-std prior as the start), multiplier ``exp(log_r)`` (K) / ``exp(log_c)`` (V) clamped to
  [6.2e-5, 65504] and rounded to fp16; ``"static"`` (V): x / exp(v_log_std) per channel;
* asymmetric RTN with fp16 scale/zero (``quantize_rtn``), the 11-ratio clip search with a strict
  comparison; round-half-to-even via the ``1.5 * 2**23`` magic number;
* packing per ``kvarn.quant.pack`` (token-major; 1/2/4/8 bits: a little-endian stream per token;
  3 bits: a 2-bit plane of the low bits, then a 1-bit plane of the high bits). Each output byte is
  ``tl.sum`` over the last axis of ``tl.reshape(codes, [G, D / per, per]) << shifts`` (disjoint bit
  fields, so the sum is an OR);
* fp16 heads store the fp16 input, fp8 heads torch's float32 → float8_e4m3fn conversion (emulated
  bit for bit: torch maps |x| >= 480 to NaN where the hardware cvt saturates to 448).

Per-kind choices (axis, normalize, hadamard, clip, codec, prior) are constexpr; the width of a head
is read at run time from a small int32 table and branches to a width-specialised quantizer. Exact
division and square root (``div_rn``, ``sqrt_rn``) and no FMA contraction (``enable_fp_fusion=False``)
keep the arithmetic the reference's; ``exp``/``log`` and the order of sums are the places where
the results may differ in the last bit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...errors import KvarnError
from ...quant.codec import NORMALIZE_ITERS
from ...quant.normalize import _EPS
from ...quant.rtn import _MIN_SCALE, CLIP_RATIOS
from ..layout import PageLayout

_NORMALIZE = {"none": 0, "tile": 1, "static": 2}
_BK = 32  # columns of x per rotation dot


# -- small helpers ---------------------------------------------------------------------------------
@triton.jit
def _div(a, b):
    """IEEE division (``/`` lowers to the approximate div.full.f32 on NVIDIA), with broadcasting."""
    a, b = tl.broadcast(a, b)
    return tl.div_rn(a, b)


@triton.jit
def _rne(y):
    """Round half to even in fp32, exact for |y| < 2**22 (callers clamp first): torch.round."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _std(x, AXIS: tl.constexpr, N: tl.constexpr):
    """Population std of a 2-D tile along AXIS (N elements): ``normalize._std``."""
    m = tl.sum(x, axis=AXIS) * (1.0 / N)
    c = x - tl.expand_dims(m, AXIS)
    return tl.sqrt_rn(tl.sum(c * c, axis=AXIS) * (1.0 / N))


@triton.jit
def _std1(v, N: tl.constexpr):
    """Population std of a vector of N elements."""
    m = tl.sum(v, axis=0) * (1.0 / N)
    c = v - m
    return tl.sqrt_rn(tl.sum(c * c, axis=0) * (1.0 / N))


@triton.jit
def _imbalance(y, G: tl.constexpr, D: tl.constexpr, EPS: tl.constexpr):
    """``normalize.imbalance`` of one tile: std of log row stds + std of log column stds."""
    log_row = tl.log(_std(y, 1, D) + EPS)
    log_col = tl.log(_std(y, 0, G) + EPS)
    return _std1(log_row, G) + _std1(log_col, D)


@triton.jit
def _variance_normalize(x, prior_ptr, G: tl.constexpr, D: tl.constexpr, HAS_PRIOR: tl.constexpr,
                        ITERS: tl.constexpr, EPS: tl.constexpr):
    """``normalize.variance_normalize`` of one tile: ``(best log_r [G], best log_c [D])``."""
    if HAS_PRIOR:
        log_c = tl.load(prior_ptr + tl.arange(0, D))
        log_r = tl.log(_std(x * tl.exp(-log_c)[None, :], 1, D) + EPS)
    else:
        log_r = tl.zeros([G], dtype=tl.float32)
        log_c = tl.zeros([D], dtype=tl.float32)
    best_r = log_r
    best_c = log_c
    best = _imbalance(x * tl.exp(-log_r[:, None] - log_c[None, :]), G, D, EPS)
    for _ in range(ITERS):
        log_c = tl.log(_std(x * tl.exp(-log_r)[:, None], 0, G) + EPS)
        log_r = tl.log(_std(x * tl.exp(-log_c)[None, :], 1, D) + EPS)
        shift = tl.sum(log_c, axis=0) * (1.0 / D)
        log_c = log_c - shift
        log_r = log_r + shift
        score = _imbalance(x * tl.exp(-log_r[:, None] - log_c[None, :]), G, D, EPS)
        better = score < best
        best = tl.where(better, score, best)
        best_r = tl.where(better, log_r, best_r)
        best_c = tl.where(better, log_c, best_c)
    return best_r, best_c


@triton.jit
def _multiplier(log_s):
    """``exp(log_s).clamp(6.2e-5, 65504).half().float()``."""
    m = tl.minimum(tl.maximum(tl.exp(log_s), 6.2e-5), 65504.0)
    return m.to(tl.float16).to(tl.float32)


@triton.jit
def _params(lo, hi, LEVELS: tl.constexpr, MIN_SCALE: tl.constexpr):
    """``rtn._params``: fp16-exact (scale, zero) of groups with range [lo, hi]."""
    scale = _div(hi - lo, tl.full(lo.shape, LEVELS, tl.float32))
    scale = tl.maximum(scale, MIN_SCALE).to(tl.float16).to(tl.float32)
    zero = tl.minimum(tl.maximum(lo, -65504.0), 65504.0).to(tl.float16).to(tl.float32)
    return scale, zero


@triton.jit
def _codes(x, scale, zero, LEVELS: tl.constexpr):
    """``rtn._codes`` as float32 integers; scale/zero already broadcastable to x."""
    y = _div(x - zero, scale)
    y = tl.minimum(tl.maximum(y, -1.0), LEVELS + 1.0)  # rounding then clamping to [0, L] is unchanged
    return tl.minimum(tl.maximum(_rne(y), 0.0), LEVELS)


@triton.jit
def _sq_err(x, scale, zero, AXIS: tl.constexpr, LEVELS: tl.constexpr):
    s = tl.expand_dims(scale, AXIS)
    z = tl.expand_dims(zero, AXIS)
    d = _codes(x, s, z, LEVELS) * s + z - x
    return tl.sum(d * d, axis=AXIS)


@triton.jit
def _rtn(x, ratios_ptr, AXIS: tl.constexpr, LEVELS: tl.constexpr, CLIP: tl.constexpr, NR: tl.constexpr,
         MIN_SCALE: tl.constexpr):
    """``rtn.quantize_rtn`` of one tile, groups reduced along AXIS: (codes f32 [G, D], scale, zero)."""
    lo = tl.min(x, axis=AXIS)
    hi = tl.max(x, axis=AXIS)
    scale, zero = _params(lo, hi, LEVELS, MIN_SCALE)
    if CLIP:
        mid = (hi + lo) * 0.5
        half = (hi - lo) * 0.5
        s, z = _params(mid - half, mid + half, LEVELS, MIN_SCALE)  # ratio 1.0: the start
        best = _sq_err(x, s, z, AXIS, LEVELS)
        for i in range(1, NR):
            r = tl.load(ratios_ptr + i)
            s, z = _params(mid - half * r, mid + half * r, LEVELS, MIN_SCALE)
            err = _sq_err(x, s, z, AXIS, LEVELS)
            better = err < best
            best = tl.where(better, err, best)
            scale = tl.where(better, s, scale)
            zero = tl.where(better, z, zero)
    codes = _codes(x, tl.expand_dims(scale, AXIS), tl.expand_dims(zero, AXIS), LEVELS)
    return codes, scale, zero


@triton.jit
def _pack(c, G: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """int32 codes [G, D] (< 2**BITS) → uint8 [G, D*BITS/8], little-endian per token."""
    PER: tl.constexpr = 8 // BITS
    c3 = tl.reshape(c, (G, D // PER, PER))
    shifts = tl.arange(0, PER) * BITS
    return tl.sum(c3 << shifts[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _quantize_store(x, u8, f16, rec8, rec16, offs_ptr, ratios_ptr, G: tl.constexpr, D: tl.constexpr,
                    BITS: tl.constexpr, AXIS: tl.constexpr, CLIP: tl.constexpr, NR: tl.constexpr,
                    MIN_SCALE: tl.constexpr):
    """RTN-quantize a (rotated, normalized) tile at BITS and write codes, scale and zero."""
    LEVELS: tl.constexpr = (1 << BITS) - 1.0
    codes, scale, zero = _rtn(x, ratios_ptr, AXIS, LEVELS, CLIP, NR, MIN_SCALE)
    c = codes.to(tl.int32)
    rows = tl.arange(0, G)
    ROW: tl.constexpr = D * BITS // 8
    base = u8 + rec8 + tl.load(offs_ptr + 0) + rows[:, None] * ROW
    if BITS == 8:
        tl.store(base + tl.arange(0, D)[None, :], c.to(tl.uint8))
    elif BITS == 3:
        tl.store(base + tl.arange(0, D // 4)[None, :], _pack(c & 3, G, D, 2))
        tl.store(base + D // 4 + tl.arange(0, D // 8)[None, :], _pack(c >> 2, G, D, 1))
    else:
        tl.store(base + tl.arange(0, ROW)[None, :], _pack(c, G, D, BITS))
    if AXIS == 0:
        idx = tl.arange(0, D)
    else:
        idx = tl.arange(0, G)
    tl.store(f16 + rec16 + tl.load(offs_ptr + 1) // 2 + idx, scale.to(tl.float16))
    tl.store(f16 + rec16 + tl.load(offs_ptr + 2) // 2 + idx, zero.to(tl.float16))


@triton.jit
def _e4m3fn_bits(x):
    """torch's float32 → float8_e4m3fn (c10 ``fp8e4m3fn_from_fp32_value``) as uint8, bit for bit."""
    b = x.to(tl.int32, bitcast=True)
    a = b & 0x7FFFFFFF
    small = (a.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
    normal = (a - (120 << 23) + 0x7FFFF + ((a >> 20) & 1)) >> 20
    r = tl.where(a >= (1087 << 20), 0x7F, tl.where(a < (121 << 23), small, normal))
    r = (r & 0xFF) | ((b >> 24) & 0x80)
    return r.to(tl.uint8)


@triton.jit
def _load_f16(x_ptr, s_g, s_d, rows, cols):
    """The input block as the engine caches it: fp16 (from any float dtype, via float32)."""
    x = tl.load(x_ptr + rows[:, None] * s_g + cols[None, :] * s_d)
    return x.to(tl.float32).to(tl.float16)


@triton.jit
def _encode_head(u8, f16, rec8, rec16, x_ptr, s_g, s_d, bits, offs_ptr, had_ptr, prior_ptr, static_ptr,
                 ratios_ptr, G: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, AXIS: tl.constexpr,
                 HAD: tl.constexpr, NORM: tl.constexpr, HAS_PRIOR: tl.constexpr, CLIP: tl.constexpr,
                 FP8: tl.constexpr, ITERS: tl.constexpr, EPS: tl.constexpr, NR: tl.constexpr,
                 MIN_SCALE: tl.constexpr):
    """Encode one head's tile (K: AXIS 0, groups over tokens; V: AXIS 1, groups over channels)."""
    rows = tl.arange(0, G)
    cols = tl.arange(0, D)
    if bits == 16:
        xh = _load_f16(x_ptr, s_g, s_d, rows, cols)
        tl.store(f16 + rec16 + tl.load(offs_ptr + 0) // 2 + rows[:, None] * D + cols[None, :], xh)
    else:
        if FP8:
            xf = _load_f16(x_ptr, s_g, s_d, rows, cols).to(tl.float32)
            tl.store(u8 + rec8 + tl.load(offs_ptr + 0) + rows[:, None] * D + cols[None, :], _e4m3fn_bits(xf))
        else:
            if HAD:
                x = tl.zeros([G, D], dtype=tl.float32)
                for kb in range(0, D, BK):
                    kk = kb + tl.arange(0, BK)
                    xa = _load_f16(x_ptr, s_g, s_d, rows, kk).to(tl.float32)
                    hb = tl.load(had_ptr + kk[:, None] * D + cols[None, :])
                    x = tl.dot(xa, hb, x, input_precision="ieee")
            else:
                x = _load_f16(x_ptr, s_g, s_d, rows, cols).to(tl.float32)
            if NORM == 1:
                best_r, best_c = _variance_normalize(x, prior_ptr, G, D, HAS_PRIOR, ITERS, EPS)
                if AXIS == 0:  # K: a per-token multiplier
                    mult = _multiplier(best_r)
                    x = _div(x, mult[:, None])
                    tl.store(f16 + rec16 + tl.load(offs_ptr + 3) // 2 + rows, mult.to(tl.float16))
                else:  # V: a per-channel multiplier
                    mult = _multiplier(best_c)
                    x = _div(x, mult[None, :])
                    tl.store(f16 + rec16 + tl.load(offs_ptr + 3) // 2 + cols, mult.to(tl.float16))
            elif NORM == 2:
                x = _div(x, tl.load(static_ptr + cols)[None, :])
            if bits == 2:
                _quantize_store(x, u8, f16, rec8, rec16, offs_ptr, ratios_ptr, G, D, 2, AXIS, CLIP, NR, MIN_SCALE)
            elif bits == 3:
                _quantize_store(x, u8, f16, rec8, rec16, offs_ptr, ratios_ptr, G, D, 3, AXIS, CLIP, NR, MIN_SCALE)
            elif bits == 4:
                _quantize_store(x, u8, f16, rec8, rec16, offs_ptr, ratios_ptr, G, D, 4, AXIS, CLIP, NR, MIN_SCALE)
            elif bits == 8:
                _quantize_store(x, u8, f16, rec8, rec16, offs_ptr, ratios_ptr, G, D, 8, AXIS, CLIP, NR, MIN_SCALE)
            else:  # 1 bit
                _quantize_store(x, u8, f16, rec8, rec16, offs_ptr, ratios_ptr, G, D, 1, AXIS, CLIP, NR, MIN_SCALE)


@triton.jit
def _store_kernel(u8, f16, page_stride, page_stride16, k_ptr, v_ptr, sk_n, sk_h, sk_g, sk_d,
                  sv_n, sv_h, sv_g, sv_d, block_ids, bits_tab, offs_tab, had_ptr, k_prior, v_prior, v_static,
                  ratios_ptr, H, G: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, ITERS: tl.constexpr,
                  EPS: tl.constexpr, NR: tl.constexpr, MIN_SCALE: tl.constexpr,
                  K_HAD: tl.constexpr, K_NORM: tl.constexpr, K_PRIOR: tl.constexpr, K_CLIP: tl.constexpr,
                  K_FP8: tl.constexpr, V_HAD: tl.constexpr, V_NORM: tl.constexpr, V_PRIOR: tl.constexpr,
                  V_CLIP: tl.constexpr, V_FP8: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    kind = tl.program_id(2)
    blk = tl.load(block_ids + t).to(tl.int64)
    rec8 = blk * page_stride
    rec16 = blk * page_stride16
    t64 = t.to(tl.int64)
    bits = tl.load(bits_tab + kind * H + h)
    offs_ptr = offs_tab + (kind * H + h) * 4
    if kind == 0:
        _encode_head(u8, f16, rec8, rec16, k_ptr + t64 * sk_n + h * sk_h, sk_g, sk_d, bits, offs_ptr, had_ptr,
                     k_prior + h * D, v_static, ratios_ptr, G, D, BK, 0, K_HAD, K_NORM, K_PRIOR, K_CLIP, K_FP8,
                     ITERS, EPS, NR, MIN_SCALE)
    else:
        _encode_head(u8, f16, rec8, rec16, v_ptr + t64 * sv_n + h * sv_h, sv_g, sv_d, bits, offs_ptr, had_ptr,
                     v_prior + h * D, v_static + h * D, ratios_ptr, G, D, BK, 1, V_HAD, V_NORM, V_PRIOR, V_CLIP,
                     V_FP8, ITERS, EPS, NR, MIN_SCALE)


# -- host side -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tables:
    bits: torch.Tensor  # int32 [2, H]
    offsets: torch.Tensor  # int32 [2, H, 4] (codes, scale, zero, norm)
    hadamard: torch.Tensor  # float32 [D, D] (a 1-element dummy when nothing rotates)
    k_prior: torch.Tensor  # float32 [H, D] log-std priors (dummies when absent)
    v_prior: torch.Tensor
    v_static: torch.Tensor  # float32 [H, D]: exp(v prior) for normalize="static"
    ratios: torch.Tensor  # float32 CLIP_RATIOS
    meta: dict  # constexpr arguments of the kernel


@functools.lru_cache(maxsize=256)
def _tables(layout: PageLayout, device: torch.device) -> _Tables:
    kt = layout.kernel_tables(device)
    fmt = layout.fmt
    dummy = torch.zeros(1, dtype=torch.float32, device=device)

    def prior(kind):
        p = layout.priors[kind]
        return None if p is None else p.to(device).float().contiguous()

    kp, vp = prior("k"), prior("v")
    if fmt.v.normalize == "static" and vp is None:
        raise KvarnError("V normalize='static' needs the recipe's per-channel log-std prior")
    # exp on the device, as the reference's codec computes it (kernel_tables' copy is made on the host)
    v_static = torch.exp(vp).contiguous() if fmt.v.normalize == "static" else dummy
    meta = dict(
        G=layout.tile, D=layout.head_dim, BK=min(_BK, layout.head_dim), ITERS=NORMALIZE_ITERS, EPS=_EPS,
        NR=len(CLIP_RATIOS), MIN_SCALE=_MIN_SCALE,
        K_HAD=fmt.k.hadamard, K_NORM=_NORMALIZE[fmt.k.normalize], K_PRIOR=kp is not None, K_CLIP=fmt.k.clip,
        K_FP8=fmt.k.codec == "fp8",
        V_HAD=fmt.v.hadamard, V_NORM=_NORMALIZE[fmt.v.normalize], V_PRIOR=vp is not None, V_CLIP=fmt.v.clip,
        V_FP8=fmt.v.codec == "fp8",
    )
    return _Tables(
        bits=torch.tensor([fmt.k.bits, fmt.v.bits], dtype=torch.int32, device=device),
        offsets=kt.offsets.to(torch.int32).contiguous(),
        hadamard=kt.hadamard.contiguous() if kt.hadamard is not None else dummy,
        k_prior=kp if kp is not None else dummy,
        v_prior=vp if vp is not None else dummy,
        v_static=v_static,
        ratios=torch.tensor(CLIP_RATIOS, dtype=torch.float32, device=device),
        meta=meta,
    )


def _num_warps(g: int, d: int) -> int:
    return 4 if g * d <= 8192 else 8 if g * d <= 16384 else 16


def store_tiles(layout: PageLayout, pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                block_ids: torch.Tensor) -> None:
    """See ``reference.store_tiles``: one launch encodes every head of K and V of ``n`` tiles."""
    n = k.shape[0]
    if n == 0:
        return
    h, g, d = layout.num_kv_heads, layout.tile, layout.head_dim
    if tuple(k.shape) != (n, h, g, d) or tuple(v.shape) != (n, h, g, d):
        raise ValueError(f"k and v must be [n, {h}, {g}, {d}]; got {tuple(k.shape)} and {tuple(v.shape)}")
    if block_ids.numel() != n:
        raise ValueError(f"block_ids has {block_ids.numel()} entries for {n} tiles")
    if pages.dtype != torch.uint8 or pages.dim() != 2 or pages.shape[1] < layout.nbytes or pages.stride(1) != 1:
        raise ValueError(f"pages must be uint8 [num_blocks, >= {layout.nbytes}] with contiguous rows")
    if pages.stride(0) % 2 or pages.storage_offset() % 2:
        raise ValueError("pages rows must start at even byte offsets (fp16 fields are written as fp16)")
    dev = pages.device
    tabs = _tables(layout, dev)
    pages16 = pages.view(torch.float16) if pages.shape[1] % 2 == 0 else pages[:, : pages.shape[1] - 1].view(torch.float16)
    ids = block_ids.to(device=dev).reshape(-1).contiguous()
    k, v = k.to(dev), v.to(dev)
    _store_kernel[(n, h, 2)](
        pages, pages16, pages.stride(0), pages16.stride(0), k, v, *k.stride(), *v.stride(), ids,
        tabs.bits, tabs.offsets, tabs.hadamard, tabs.k_prior, tabs.v_prior, tabs.v_static, tabs.ratios, h,
        **tabs.meta, num_warps=_num_warps(g, d), num_stages=1, enable_fp_fusion=False,
    )
