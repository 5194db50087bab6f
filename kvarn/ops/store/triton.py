"""Triton store: encode completed tiles of one layer (all KV heads, K and V) into pages, one launch.

``store_tiles`` computes what ``reference.store_tiles`` computes (``PageLayout.encode`` →
``kvarn.quant.codec.encode_tiles``), in float32, op for op:

* two launches. Prepare: one program per (tile, KV head, K/V), grid ``(n, H, 2)``, holds its
  head's whole ``[G, D]`` tile in registers (the rotation and the normalization need all of it)
  and writes the tile the quantizer sees to a float32 workspace. Quantize: ``NP`` programs per
  head (grid ``(n, H, 2 NP)``), each a slice of whole groups (K: D/NP channels, V: G/NP tokens):
  the 11-ratio clip search, most of the work, runs on NP times more SMs (one tile: 16 programs
  ran the whole store on 16 of the H200's 132 SMs, 190 µs).
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
* fp16 heads store the fp16 input, fp8 heads torch's float32 → float8_e4m3fn conversion, emulated
  bit for bit in integer arithmetic (not the hardware cvt: torch versions differ from it, and from
  each other, past 448; the installed torch's rule is probed once per device).

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
# Small helpers are inlined by hand where they sit in loops: under TRITON_INTERPRET every call of a
# jit function re-patches triton.language (~1 ms), which would dominate the CPU tests.
@triton.jit
def _imbalance(y, G: tl.constexpr, D: tl.constexpr, EPS: tl.constexpr):
    """``normalize.imbalance`` of one tile: std of log row stds + std of log column stds.

    Every std is ``normalize._std`` (population: centre, mean of squares, IEEE sqrt)."""
    c = y - (tl.sum(y, axis=1) * (1.0 / D))[:, None]
    log_row = tl.log(tl.sqrt_rn(tl.sum(c * c, axis=1) * (1.0 / D)) + EPS)  # [G]
    c = y - (tl.sum(y, axis=0) * (1.0 / G))[None, :]
    log_col = tl.log(tl.sqrt_rn(tl.sum(c * c, axis=0) * (1.0 / G)) + EPS)  # [D]
    cr = log_row - tl.sum(log_row, axis=0) * (1.0 / G)
    cc = log_col - tl.sum(log_col, axis=0) * (1.0 / D)
    return tl.sqrt_rn(tl.sum(cr * cr, axis=0) * (1.0 / G)) + tl.sqrt_rn(tl.sum(cc * cc, axis=0) * (1.0 / D))


@triton.jit
def _variance_normalize(x, prior_ptr, G: tl.constexpr, D: tl.constexpr, HAS_PRIOR: tl.constexpr,
                        ITERS: tl.constexpr, EPS: tl.constexpr):
    """``normalize.variance_normalize`` of one tile: ``(best log_r [G], best log_c [D])``."""
    if HAS_PRIOR:
        log_c = tl.load(prior_ptr + tl.arange(0, D))
        y = x * tl.exp(-log_c)[None, :]
        c = y - (tl.sum(y, axis=1) * (1.0 / D))[:, None]
        log_r = tl.log(tl.sqrt_rn(tl.sum(c * c, axis=1) * (1.0 / D)) + EPS)
    else:
        log_r = tl.zeros([G], dtype=tl.float32)
        log_c = tl.zeros([D], dtype=tl.float32)
    best_r = log_r
    best_c = log_c
    best = _imbalance(x * tl.exp(-log_r[:, None] - log_c[None, :]), G, D, EPS)
    for _ in range(ITERS):
        y = x * tl.exp(-log_r)[:, None]  # column step: std over rows of x / r
        c = y - (tl.sum(y, axis=0) * (1.0 / G))[None, :]
        log_c = tl.log(tl.sqrt_rn(tl.sum(c * c, axis=0) * (1.0 / G)) + EPS)
        y = x * tl.exp(-log_c)[None, :]  # row step: std over columns of x / c
        c = y - (tl.sum(y, axis=1) * (1.0 / D))[:, None]
        log_r = tl.log(tl.sqrt_rn(tl.sum(c * c, axis=1) * (1.0 / D)) + EPS)
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
    scale = tl.div_rn(hi - lo, tl.full(lo.shape, LEVELS, tl.float32))
    # saturate at fp16's largest finite number like rtn._params: inf would make every code NaN
    scale = tl.minimum(tl.maximum(scale, MIN_SCALE), 65504.0).to(tl.float16).to(tl.float32)
    zero = tl.minimum(tl.maximum(lo, -65504.0), 65504.0).to(tl.float16).to(tl.float32)
    return scale, zero


@triton.jit
def _codes(x, scale, zero, LEVELS: tl.constexpr):
    """``rtn._codes`` as float32 integers; scale/zero already broadcastable to x."""
    d = x - zero
    y = tl.div_rn(d, tl.broadcast_to(scale, d.shape))
    y = tl.minimum(tl.maximum(y, -1.0), LEVELS + 1.0)  # rounding then clamping to [0, L] is unchanged
    y = (y + 12582912.0) - 12582912.0  # round half to even (torch.round): exact for |y| < 2**22
    return tl.minimum(tl.maximum(y, 0.0), LEVELS)


@triton.jit
def _clip_candidate(x, mid, half, r, AXIS: tl.constexpr, LEVELS: tl.constexpr, MIN_SCALE: tl.constexpr):
    """One clip ratio: ``_params(mid -/+ half * r)`` and the groups' squared error of its codes
    (``_params`` and ``_codes`` inlined)."""
    lo = mid - half * r
    hi = mid + half * r
    s = tl.div_rn(hi - lo, tl.full(lo.shape, LEVELS, tl.float32))
    s = tl.minimum(tl.maximum(s, MIN_SCALE), 65504.0).to(tl.float16).to(tl.float32)
    z = tl.minimum(tl.maximum(lo, -65504.0), 65504.0).to(tl.float16).to(tl.float32)
    se = tl.expand_dims(s, AXIS)
    ze = tl.expand_dims(z, AXIS)
    d = x - ze
    y = tl.div_rn(d, tl.broadcast_to(se, d.shape))
    y = tl.minimum(tl.maximum(y, -1.0), LEVELS + 1.0)
    y = tl.minimum(tl.maximum((y + 12582912.0) - 12582912.0, 0.0), LEVELS)
    e = y * se + ze - x
    return s, z, tl.sum(e * e, axis=AXIS)


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
        _, _, best = _clip_candidate(x, mid, half, 1.0, AXIS, LEVELS, MIN_SCALE)  # ratio 1.0: the start
        for i in range(1, NR):
            s, z, err = _clip_candidate(x, mid, half, tl.load(ratios_ptr + i), AXIS, LEVELS, MIN_SCALE)
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
def _quantize_store(x, u8, f16, rec8, rec16, offs_ptr, ratios_ptr, r0, c0, R: tl.constexpr, C: tl.constexpr,
                    D: tl.constexpr, BITS: tl.constexpr, LEVELS: tl.constexpr, AXIS: tl.constexpr,
                    CLIP: tl.constexpr, NR: tl.constexpr, MIN_SCALE: tl.constexpr):
    """RTN-quantize the block ``x [R, C]`` at rows ``r0..``, channels ``c0..`` of a (rotated,
    normalized) tile at BITS (LEVELS = 2**BITS - 1) and write its codes and its groups' scale/zero.
    The block holds whole groups (K: ``R = G`` tokens of C channels; V: R tokens of all ``C = D``
    channels) and whole packed bytes (C a multiple of 8)."""
    codes, scale, zero = _rtn(x, ratios_ptr, AXIS, LEVELS, CLIP, NR, MIN_SCALE)
    c = codes.to(tl.int32)
    rows = r0 + tl.arange(0, R)
    ROW: tl.constexpr = D * BITS // 8
    base = u8 + rec8 + tl.load(offs_ptr + 0) + rows[:, None] * ROW
    if BITS == 8:
        tl.store(base + c0 + tl.arange(0, C)[None, :], c.to(tl.uint8))
    elif BITS == 3:
        tl.store(base + c0 // 4 + tl.arange(0, C // 4)[None, :], _pack(c & 3, R, C, 2))
        tl.store(base + D // 4 + c0 // 8 + tl.arange(0, C // 8)[None, :], _pack(c >> 2, R, C, 1))
    else:
        tl.store(base + c0 * BITS // 8 + tl.arange(0, C * BITS // 8)[None, :], _pack(c, R, C, BITS))
    if AXIS == 0:
        idx = c0 + tl.arange(0, C)
    else:
        idx = rows
    tl.store(f16 + rec16 + tl.load(offs_ptr + 1) // 2 + idx, scale.to(tl.float16))
    tl.store(f16 + rec16 + tl.load(offs_ptr + 2) // 2 + idx, zero.to(tl.float16))


@triton.jit
def _e4m3fn_bits(x, SAT_CARRY: tl.constexpr, SAT_OVER: tl.constexpr):
    """torch's float32 → float8_e4m3fn (c10 ``fp8e4m3fn_from_fp32_value``) as uint8, bit for bit.

    torch versions differ past 448 (``_fp8_rules``): SAT_CARRY, a value that rounds up into the NaN
    pattern 0x7f ((464, 480)) gives 448 (0x7e) rather than NaN; SAT_OVER, |x| >= 480 and inf give
    448 rather than NaN. NaN gives NaN (0x7f) always."""
    b = x.to(tl.int32, bitcast=True)
    a = b & 0x7FFFFFFF
    small = (a.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)
    normal = ((a - (120 << 23) + 0x7FFFF + ((a >> 20) & 1)) >> 20) & 0xFF
    r = tl.where(a < (121 << 23), small, normal)
    if SAT_CARRY:
        r = tl.where(r == 0x7F, 0x7E, r)
    if SAT_OVER:
        r = tl.where(a >= (1087 << 20), 0x7E, r)
        r = tl.where(a > 0x7F800000, 0x7F, r)
    else:
        r = tl.where(a >= (1087 << 20), 0x7F, r)
    r = r | ((b >> 24) & 0x80)
    return r.to(tl.uint8)


@triton.jit
def _load_f16(x_ptr, s_g, s_d, rows, cols):
    """The input block as the engine caches it: fp16 (from any float dtype, via float32)."""
    x = tl.load(x_ptr + rows[:, None] * s_g + cols[None, :] * s_d)
    return x.to(tl.float32).to(tl.float16)


@triton.jit
def _prepare_head(u8, f16, rec8, rec16, x_ptr, s_g, s_d, bits, offs_ptr, had_ptr, prior_ptr, static_ptr, ws,
                  G: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, AXIS: tl.constexpr, HAD: tl.constexpr,
                  NORM: tl.constexpr, HAS_PRIOR: tl.constexpr, FP8: tl.constexpr, FP8_SAT_CARRY: tl.constexpr,
                  FP8_SAT_OVER: tl.constexpr, ITERS: tl.constexpr, EPS: tl.constexpr):
    """Phase 1 for one head's tile (K: AXIS 0, groups over tokens; V: AXIS 1, groups over channels):
    fp16/fp8 heads are written whole; others are rotated and normalized (multipliers written to the
    page) and the tile the quantizer sees goes to the float32 workspace ``ws [G, D]``."""
    rows = tl.arange(0, G)
    cols = tl.arange(0, D)
    if bits == 16:
        xh = _load_f16(x_ptr, s_g, s_d, rows, cols)
        tl.store(f16 + rec16 + tl.load(offs_ptr + 0) // 2 + rows[:, None] * D + cols[None, :], xh)
    else:
        if FP8:
            xf = _load_f16(x_ptr, s_g, s_d, rows, cols).to(tl.float32)
            q = _e4m3fn_bits(xf, FP8_SAT_CARRY, FP8_SAT_OVER)
            tl.store(u8 + rec8 + tl.load(offs_ptr + 0) + rows[:, None] * D + cols[None, :], q)
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
                    x = tl.div_rn(x, tl.broadcast_to(mult[:, None], x.shape))
                    tl.store(f16 + rec16 + tl.load(offs_ptr + 3) // 2 + rows, mult.to(tl.float16))
                else:  # V: a per-channel multiplier
                    mult = _multiplier(best_c)
                    x = tl.div_rn(x, tl.broadcast_to(mult[None, :], x.shape))
                    tl.store(f16 + rec16 + tl.load(offs_ptr + 3) // 2 + cols, mult.to(tl.float16))
            elif NORM == 2:
                x = tl.div_rn(x, tl.broadcast_to(tl.load(static_ptr + cols)[None, :], x.shape))
            tl.store(ws + rows[:, None] * D + cols[None, :], x)


@triton.jit
def _quantize_part(u8, f16, rec8, rec16, bits, offs_ptr, ratios_ptr, ws, part, G: tl.constexpr, D: tl.constexpr,
                   NP: tl.constexpr, AXIS: tl.constexpr, CLIP: tl.constexpr, FP8: tl.constexpr, NR: tl.constexpr,
                   MIN_SCALE: tl.constexpr):
    """Phase 2: part ``part`` of ``NP`` of one head's prepared tile (K: D/NP channels, V: G/NP
    tokens; the groups are independent, so the clip search and the packing split without loss)."""
    if bits != 16 and not FP8:
        if AXIS == 0:
            R: tl.constexpr = G
            C: tl.constexpr = D // NP
            r0 = 0
            c0 = part * C
        else:
            R: tl.constexpr = G // NP
            C: tl.constexpr = D
            r0 = part * R
            c0 = 0
        x = tl.load(ws + (r0 + tl.arange(0, R))[:, None] * D + (c0 + tl.arange(0, C))[None, :])
        if bits == 2:
            _quantize_store(x, u8, f16, rec8, rec16, offs_ptr, ratios_ptr, r0, c0, R, C, D, 2, 3.0, AXIS, CLIP, NR,
                            MIN_SCALE)
        elif bits == 3:
            _quantize_store(x, u8, f16, rec8, rec16, offs_ptr, ratios_ptr, r0, c0, R, C, D, 3, 7.0, AXIS, CLIP, NR,
                            MIN_SCALE)
        elif bits == 4:
            _quantize_store(x, u8, f16, rec8, rec16, offs_ptr, ratios_ptr, r0, c0, R, C, D, 4, 15.0, AXIS, CLIP,
                            NR, MIN_SCALE)
        elif bits == 8:
            _quantize_store(x, u8, f16, rec8, rec16, offs_ptr, ratios_ptr, r0, c0, R, C, D, 8, 255.0, AXIS, CLIP,
                            NR, MIN_SCALE)
        else:  # 1 bit
            _quantize_store(x, u8, f16, rec8, rec16, offs_ptr, ratios_ptr, r0, c0, R, C, D, 1, 1.0, AXIS, CLIP, NR,
                            MIN_SCALE)


@triton.jit
def _store_kernel(u8, f16, page_stride, page_stride16, k_ptr, v_ptr, sk_n, sk_h, sk_g, sk_d,
                  sv_n, sv_h, sv_g, sv_d, block_ids, bits_tab, offs_tab, had_ptr, k_prior, v_prior, v_static,
                  ratios_ptr, ws_ptr, H, G: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, ITERS: tl.constexpr,
                  EPS: tl.constexpr, NR: tl.constexpr, MIN_SCALE: tl.constexpr,
                  K_HAD: tl.constexpr, K_NORM: tl.constexpr, K_PRIOR: tl.constexpr, K_CLIP: tl.constexpr,
                  K_FP8: tl.constexpr, V_HAD: tl.constexpr, V_NORM: tl.constexpr, V_PRIOR: tl.constexpr,
                  V_CLIP: tl.constexpr, V_FP8: tl.constexpr, FP8_SAT_CARRY: tl.constexpr,
                  FP8_SAT_OVER: tl.constexpr, PHASE: tl.constexpr, NP: tl.constexpr):
    """PHASE 1: grid ``(n, H, 2)``, one program per (tile, head, K/V) prepares the tile; PHASE 2:
    grid ``(n, H, 2 * NP)``, ``NP`` programs per head quantize and pack its parts."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    if PHASE == 1:
        kind = tl.program_id(2)
        part = 0
    else:
        kind = tl.program_id(2) // NP
        part = tl.program_id(2) % NP
    blk = tl.load(block_ids + t).to(tl.int64)
    rec8 = blk * page_stride
    rec16 = blk * page_stride16
    t64 = t.to(tl.int64)
    bits = tl.load(bits_tab + kind * H + h)
    offs_ptr = offs_tab + (kind * H + h) * 4
    ws = ws_ptr + ((t64 * H + h) * 2 + kind) * (G * D)
    if kind == 0:
        if PHASE == 1:
            _prepare_head(u8, f16, rec8, rec16, k_ptr + t64 * sk_n + h * sk_h, sk_g, sk_d, bits, offs_ptr, had_ptr,
                          k_prior + h * D, v_static, ws, G, D, BK, 0, K_HAD, K_NORM, K_PRIOR, K_FP8, FP8_SAT_CARRY,
                          FP8_SAT_OVER, ITERS, EPS)
        else:
            _quantize_part(u8, f16, rec8, rec16, bits, offs_ptr, ratios_ptr, ws, part, G, D, NP, 0, K_CLIP, K_FP8,
                           NR, MIN_SCALE)
    else:
        if PHASE == 1:
            _prepare_head(u8, f16, rec8, rec16, v_ptr + t64 * sv_n + h * sv_h, sv_g, sv_d, bits, offs_ptr, had_ptr,
                          v_prior + h * D, v_static + h * D, ws, G, D, BK, 1, V_HAD, V_NORM, V_PRIOR, V_FP8,
                          FP8_SAT_CARRY, FP8_SAT_OVER, ITERS, EPS)
        else:
            _quantize_part(u8, f16, rec8, rec16, bits, offs_ptr, ratios_ptr, ws, part, G, D, NP, 1, V_CLIP, V_FP8,
                           NR, MIN_SCALE)


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
        NR=len(CLIP_RATIOS), MIN_SCALE=_MIN_SCALE, **_fp8_rules(device),
    )
    for kind, tf, p in (("K", fmt.k, kp), ("V", fmt.v, vp)):
        meta.update({f"{kind}_HAD": tf.hadamard, f"{kind}_NORM": _NORMALIZE[tf.normalize],
                     f"{kind}_PRIOR": p is not None and tf.normalize == "tile", f"{kind}_CLIP": tf.clip,
                     f"{kind}_FP8": tf.codec == "fp8"})
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


@functools.lru_cache(maxsize=8)
def _fp8_rules(device: torch.device) -> dict:
    """How this torch casts to float8_e4m3fn past 448 (2.13: (464, 480) and >= 480 → 448; 2.11, CPU and
    CUDA: both → NaN), probed once per device: the kernel reproduces the reference's cast."""
    probe = torch.tensor([472.0, 1000.0, float("inf")], device=device).to(torch.float8_e4m3fn)
    carry, over, inf = probe.view(torch.uint8).tolist()
    if not {carry, over, inf} <= {0x7E, 0x7F} or over != inf:
        raise KvarnError(f"this torch casts 472, 1000, inf to float8_e4m3fn bytes {[carry, over, inf]}, which the "
                         "Triton store does not emulate; use the reference store (KVARN_OPS=reference)")
    return {"FP8_SAT_CARRY": carry == 0x7E, "FP8_SAT_OVER": over == 0x7E}


def _num_warps(g: int, d: int) -> int:
    return 4 if g * d <= 8192 else 8 if g * d <= 16384 else 16


def store_tiles(layout: PageLayout, pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                block_ids: torch.Tensor, num_warps: int | None = None) -> None:
    """See ``reference.store_tiles``: one launch encodes every head of K and V of ``n`` tiles.

    ``num_warps``: threads per program (default by tile size); one program holds a whole tile, so
    more warps mean fewer tile elements per thread on the serial normalization and clip passes."""
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
    pages16 = pages[:, : pages.shape[1] // 2 * 2].view(torch.float16)  # the fp16 fields' pointer
    ids = block_ids.to(device=dev).reshape(-1).contiguous()
    k, v = k.to(dev), v.to(dev)
    # the prepared tiles the quantizer sees: float32 [n, H, 2, G, D], transient (bounded by the step)
    ws = torch.empty(n * h * 2 * g * d, dtype=torch.float32, device=dev)
    parts = store_parts(g, d)
    args = (pages, pages16, pages.stride(0), pages16.stride(0), k, v, *k.stride(), *v.stride(), ids,
            tabs.bits, tabs.offsets, tabs.hadamard, tabs.k_prior, tabs.v_prior, tabs.v_static, tabs.ratios, ws, h)
    _store_kernel[(n, h, 2)](*args, **tabs.meta, PHASE=1, NP=parts, num_warps=num_warps or _num_warps(g, d),
                             num_stages=1, enable_fp_fusion=False)
    _store_kernel[(n, h, 2 * parts)](*args, **tabs.meta, PHASE=2, NP=parts, num_warps=4, num_stages=1,
                                     enable_fp_fusion=False)


def store_parts(g: int, d: int) -> int:
    """Programs per head in the quantize phase: 8 where the parts stay whole packed bytes (K parts
    are D/8 channels: at least 8, one 1-bit byte) and at least 8 tokens (V)."""
    return max(1, min(8, d // 8, g // 8))
