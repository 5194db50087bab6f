"""Triton decode attention over packed pages (see ``reference.py`` for the function computed).

Kernels:

* ``_paged_kernel`` — one program per (row block, KV head of a head group, split). A row block is
  the whole GQA group of one or more query tokens of one sequence, padded to ``M >= 16`` rows: the
  N side of every dot, so each packed byte is read once per KV head. The program walks its split
  of the sequence's tiles; per sub-tile of ``BT`` tokens the packed codes are read straight from
  the page and turned into fp16 in registers — no dequantized copy in HBM. The KV tile is the M
  side of the score dot (``s^T [BT, M]``). Scales are folded out of the inner loop:
  K (per channel): ``s = norm_t * (q' . code_t + q . zero)`` with ``q' = q * scale`` per tile;
  V (per token): ``o += norm_c * ((p * scale) . code + sum(p * zero))``.
  Codes are never interleaved in registers: field ``j`` of each byte (channels ``j, j+PER, ...``)
  gets its own dot (``PER = 8 / bits``) and, for V, its own accumulator, stored at the end to its
  strided channels. The query is rotated once per launch and the output of rotated V heads is
  un-rotated once after the combine (torch matmuls outside the programs: an fp32 rotation inside
  each program spilled registers, ``bench/kernels_ptxas.py``); partials are in the stored basis.
* ``_staged_kernel`` — the fp16 part of a decode step (first tile + open tile from staging).
* ``_combine_kernel`` — merges the splits' partial results by their log-sum-exp.

Partial results carry base-2 log-sum-exps (the kernels work in ``exp2`` with ``log2(e)`` folded
into the query scale).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ..layout import PageLayout, stored_form

LOG2E = 1.4426950408889634
LOG2E_C = tl.constexpr(LOG2E)
MAX_SPLITS = 32


# ---------------------------------------------------------------------------------------------
@triton.jit
def _to_f16(c, CVT: tl.constexpr):
    """Small unsigned integer codes → fp16. CVT 1 (and 2 where PTX does not apply): OR into the
    mantissa of 1024.0 (0x6400) and subtract 1024 in fp16 (exact); CVT 0: a plain conversion."""
    if CVT >= 1:
        return (c.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    else:
        return c.to(tl.float16)


def _ptx_field_asm(bits: int, j: int) -> str:
    """PTX turning 4 packed bytes into 4 fp16 codes (field ``j`` of width ``bits``), 1.5 instr per code.

    ``prmt`` moves bytes 0,1 (2,3) into the low bytes of two 16-bit lanes; ``lop3`` keeps the
    field, still shifted by ``j * bits``, and ORs in the exponent of 1024.0 (0x6400): each lane is
    then the fp16 value ``1024 + code * 2**(j*bits)``, exactly; one ``fma.rn.f16x2`` by
    ``2**-(j*bits)`` minus 1024 * that gives the code (all values are integers below 2048: exact).
    """
    shift = j * bits
    mask = (((1 << bits) - 1) << shift) * 0x00010001
    if bits == 8:
        mask = 0x00FF00FF
    scale = torch.tensor(2.0 ** -shift, dtype=torch.float16).view(torch.int16).item() & 0xFFFF
    bias = torch.tensor(-1024.0 * 2.0 ** -shift, dtype=torch.float16).view(torch.int16).item() & 0xFFFF
    return (
        "{\n.reg .b32 t0, t1, s, c, z, m, e;\n"
        "mov.b32 z, 0;\n"
        f"mov.b32 m, {mask:#010x};\n"
        "mov.b32 e, 0x64006400;\n"
        "prmt.b32 t0, $2, z, 0x4140;\n"
        "prmt.b32 t1, $2, z, 0x4342;\n"
        "lop3.b32 t0, t0, m, e, 0xEA;\n"
        "lop3.b32 t1, t1, m, e, 0xEA;\n"
        f"mov.b32 s, {scale * 0x10001:#010x};\n"
        f"mov.b32 c, {bias * 0x10001:#010x};\n"
        "fma.rn.f16x2 $0, t0, s, c;\n"
        "fma.rn.f16x2 $1, t1, s, c;\n}"
    )


PTX_2_0, PTX_2_1, PTX_2_2, PTX_2_3 = (tl.constexpr(_ptx_field_asm(2, j)) for j in range(4))
PTX_4_0, PTX_4_1 = (tl.constexpr(_ptx_field_asm(4, j)) for j in range(2))
PTX_8_0 = tl.constexpr(_ptx_field_asm(8, 0))


@triton.jit
def _ptx(raw, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,=r,r", [raw], dtype=tl.float16, is_pure=True, pack=4)


@triton.jit
def _ptx_field(raw, BITS: tl.constexpr, J: tl.constexpr):
    if BITS == 8:
        return _ptx(raw, PTX_8_0)
    elif BITS == 4:
        if J == 0:
            return _ptx(raw, PTX_4_0)
        else:
            return _ptx(raw, PTX_4_1)
    else:
        if J == 0:
            return _ptx(raw, PTX_2_0)
        elif J == 1:
            return _ptx(raw, PTX_2_1)
        elif J == 2:
            return _ptx(raw, PTX_2_2)
        else:
            return _ptx(raw, PTX_2_3)


@triton.jit
def _raw(u8, f16, base, t, i, ROW: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """The packed bytes ``[BT, DP]`` of tokens ``t`` of a codes field at byte ``base`` (fp16 values
    for 16-bit heads; the 2-bit plane for 3-bit heads). Loaded once per sub-tile, shared by fields."""
    if BITS == 16:
        return tl.load(f16 + (base // 2 + t[:, None] * D + i[None, :]))
    else:
        return tl.load(u8 + (base + t[:, None] * ROW + i[None, :]))


@triton.jit
def _raw_hi(u8, base, t, i, ROW: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
    """3-bit heads: the 1-bit plane byte holding channel ``i * 4 + J``'s high bit (each byte serves
    two ``i``); other widths: nothing (a scalar placeholder)."""
    if BITS == 3:
        return tl.load(u8 + (base + t[:, None] * ROW + D // 4 + (i // 2)[None, :])).to(tl.int32)
    else:
        return 0


@triton.jit
def _field(raw, hi, i, J: tl.constexpr, BITS: tl.constexpr, FP8: tl.constexpr, CVT: tl.constexpr):
    """fp16 ``[BT, DP]``: codes of field J (channels ``i * PER + J``) from the loaded bytes."""
    if BITS == 16:
        return raw
    elif FP8:
        return raw.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    elif BITS == 3:
        c = ((raw.to(tl.int32) >> (2 * J)) & 3) | (((hi >> (4 * (i % 2)[None, :] + J)) & 1) << 2)
        return _to_f16(c, CVT)
    elif CVT == 2:  # inline PTX (compiled GPUs only; the interpreter runs CVT 0/1)
        return _ptx_field(raw, BITS, J)
    else:
        c = (raw.to(tl.int32) >> (J * BITS)) & ((1 << BITS) - 1)
        return _to_f16(c, CVT)


@triton.jit
def _q_field(q_ptr, q_off, rows_ok, i, J: tl.constexpr, PER: tl.constexpr, qscale):
    """float32 ``[M, DP]``: the query's channels ``i * PER + J`` (already rotated where K is), times ``qscale``."""
    q = tl.load(q_ptr + q_off[:, None] + (i * PER + J)[None, :], mask=rows_ok[:, None], other=0.0)
    return q.to(tl.float32) * qscale


@triton.jit
def _k_dot(raw, hi, i, q_j, ks, kz, J: tl.constexpr, BITS: tl.constexpr, FP8: tl.constexpr, CVT: tl.constexpr,
           SCALED: tl.constexpr):
    """(``codes_J . (q_J * scale_J)`` as ``[BT, M]``, ``q_J . zero_J`` as ``[M]``)."""
    c = _field(raw, hi, i, J, BITS, FP8, CVT)
    if SCALED:
        qs = tl.trans((q_j * ks[None, :]).to(tl.float16))
        return tl.dot(c, qs), tl.sum(q_j * kz[None, :], 1)
    else:
        return tl.dot(c, tl.trans(q_j.to(tl.float16))), tl.sum(q_j * 0.0, 1)


@triton.jit
def _v_dot(raw, hi, i, pv, acc, alpha, pz, vn, J: tl.constexpr, BITS: tl.constexpr, FP8: tl.constexpr,
           CVT: tl.constexpr, TILE_NORM: tl.constexpr):
    """acc_J ``[M, DP]`` updated with one sub-tile: ``alpha * acc + norm_J * (pv . codes_J + pz)``."""
    c = _field(raw, hi, i, J, BITS, FP8, CVT)
    part = tl.dot(pv, c) + pz[:, None]
    if TILE_NORM:
        part = part * vn[None, :]
    return acc * alpha[:, None] + part


@triton.jit
def _field_vec(f16, base, i, J: tl.constexpr, PER: tl.constexpr, ON: tl.constexpr):
    """float32 ``[DP]``: a per-channel fp16 field's channels ``i * PER + J`` (0 where absent)."""
    if ON:
        return tl.load(f16 + (base // 2 + i * PER + J)).to(tl.float32)
    else:
        return tl.zeros(i.shape, tl.float32)


@triton.jit
def _tok_vec(f16, base, t, ON: tl.constexpr):
    """float32 ``[BT]``: a per-token fp16 field at tokens ``t`` (0 where absent)."""
    if ON:
        return tl.load(f16 + (base // 2 + t)).to(tl.float32)
    else:
        return tl.zeros(t.shape, tl.float32)


@triton.jit
def _scales(f16, page, t, ki, vi, ksc, kz, kn, vsc, vz, vn, K_PER: tl.constexpr, K_SCALED: tl.constexpr,
            K_NORM: tl.constexpr, V_PER: tl.constexpr, V_SCALED: tl.constexpr, V_TILE_NORM: tl.constexpr):
    """The small fp16 fields of one sub-tile (K scale/zero per field, K norm per token, V scale/zero
    per token, V norm per field) as float32 vectors; absent ones are zeros (never read)."""
    return (_field_vec(f16, page + ksc, ki, 0, K_PER, K_SCALED), _field_vec(f16, page + kz, ki, 0, K_PER, K_SCALED),
            _field_vec(f16, page + ksc, ki, 1, K_PER, K_SCALED and K_PER > 1),
            _field_vec(f16, page + kz, ki, 1, K_PER, K_SCALED and K_PER > 1),
            _field_vec(f16, page + ksc, ki, 2, K_PER, K_SCALED and K_PER > 2),
            _field_vec(f16, page + kz, ki, 2, K_PER, K_SCALED and K_PER > 2),
            _field_vec(f16, page + ksc, ki, 3, K_PER, K_SCALED and K_PER > 2),
            _field_vec(f16, page + kz, ki, 3, K_PER, K_SCALED and K_PER > 2),
            _tok_vec(f16, page + kn, t, K_NORM), _tok_vec(f16, page + vsc, t, V_SCALED),
            _tok_vec(f16, page + vz, t, V_SCALED),
            _field_vec(f16, page + vn, vi, 0, V_PER, V_TILE_NORM),
            _field_vec(f16, page + vn, vi, 1, V_PER, V_TILE_NORM and V_PER > 1),
            _field_vec(f16, page + vn, vi, 2, V_PER, V_TILE_NORM and V_PER > 2),
            _field_vec(f16, page + vn, vi, 3, V_PER, V_TILE_NORM and V_PER > 2))


@triton.jit
def _store_out(ws_o, o_off, rows_ok, acc, i, v_static, J: tl.constexpr, PER: tl.constexpr, STATIC: tl.constexpr,
               inv_l):
    """Accumulator J, normalized, to its channels ``i * PER + J`` (in the stored basis: the
    un-rotation of rotated V heads happens once after the combine, outside the programs)."""
    a = acc * inv_l[:, None]
    if STATIC:
        a = a * tl.load(v_static + i * PER + J)[None, :]
    tl.store(ws_o + o_off[:, None] + (i * PER + J)[None, :], a, mask=rows_ok[:, None])


@triton.jit
def _sub_tile(kraw, khi, vraw, vhi, sc, ki, vi, live, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3,
              K_PER: tl.constexpr, K_BITS: tl.constexpr, K_FP8: tl.constexpr, K_SCALED: tl.constexpr,
              K_NORM: tl.constexpr, V_PER: tl.constexpr, V_BITS: tl.constexpr, V_FP8: tl.constexpr,
              V_SCALED: tl.constexpr, V_NORM: tl.constexpr, CVT: tl.constexpr):
    """One sub-tile: scores, online softmax, V accumulation (``sc``: its ``_scales``)."""
    ks0, kz0, ks1, kz1, ks2, kz2, ks3, kz3, knorm, vs, vzp, vn0, vn1, vn2, vn3 = sc
    s, bias = _k_dot(kraw, khi, ki, q0, ks0, kz0, 0, K_BITS, K_FP8, CVT, K_SCALED)
    if K_PER > 1:
        s1, b1 = _k_dot(kraw, khi, ki, q1, ks1, kz1, 1, K_BITS, K_FP8, CVT, K_SCALED)
        s += s1
        bias += b1
    if K_PER > 2:
        s2, b2 = _k_dot(kraw, khi, ki, q2, ks2, kz2, 2, K_BITS, K_FP8, CVT, K_SCALED)
        s3, b3 = _k_dot(kraw, khi, ki, q3, ks3, kz3, 3, K_BITS, K_FP8, CVT, K_SCALED)
        s += s2 + s3
        bias += b2 + b3
    s = s + bias[None, :]
    if K_NORM:
        s = s * knorm[:, None]
    s = tl.where(live[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[None, :])  # [BT, M]
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 0)
    m_i = m_new
    if V_SCALED:
        pv = tl.trans((p * vs[:, None]).to(tl.float16))
        pz = tl.sum(p * vzp[:, None], 0)
    else:
        pv = tl.trans(p.to(tl.float16))
        pz = tl.sum(p * 0.0, 0)
    a0 = _v_dot(vraw, vhi, vi, pv, a0, alpha, pz, vn0, 0, V_BITS, V_FP8, CVT, V_NORM == 1)
    if V_PER > 1:
        a1 = _v_dot(vraw, vhi, vi, pv, a1, alpha, pz, vn1, 1, V_BITS, V_FP8, CVT, V_NORM == 1)
    if V_PER > 2:
        a2 = _v_dot(vraw, vhi, vi, pv, a2, alpha, pz, vn2, 2, V_BITS, V_FP8, CVT, V_NORM == 1)
        a3 = _v_dot(vraw, vhi, vi, pv, a3, alpha, pz, vn3, 3, V_BITS, V_FP8, CVT, V_NORM == 1)
    return m_i, l_i, a0, a1, a2, a3


# Integer arguments that change from step to step are not specialized on (Triton compiles a variant
# for a value of 1 and for multiples of 16): in vLLM's burst A the batch, the split count and the
# block-table width change with every prefill that completes, and each new variant compiled during
# serving (about 12 s of a 57 s burst on the H200, 2026-12-03, estimated from its step times).
@triton.jit(do_not_specialize=["ws_stride_s", "bt_stride", "SPLITS"])
def _paged_kernel(
    q_ptr, stride_qt, stride_qh,
    ws_o, ws_lse, ws_stride_s,  # partials [S, T, Hq, D] float32 / [S, T, Hq] float32
    u8, f16, page_stride,
    offsets, heads, v_static,
    block_table, bt_stride, q_tile, page_start,
    row_seq, row_tok0, row_ntok,
    qscale, num_kv_heads,
    HQ: tl.constexpr, GROUP: tl.constexpr, TOKS: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
    G: tl.constexpr, BT: tl.constexpr, SPLITS, ROWS_ARE_SEQS: tl.constexpr,
    K_BITS: tl.constexpr, K_FP8: tl.constexpr, K_NORM: tl.constexpr,
    V_BITS: tl.constexpr, V_FP8: tl.constexpr, V_NORM: tl.constexpr,
    CVT: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid_r = tl.program_id(0)
    h = tl.load(heads + tl.program_id(1))
    pid_s = tl.program_id(2)
    if ROWS_ARE_SEQS:
        b = pid_r
        tok0 = pid_r
        ntok = 1
    else:
        b = tl.load(row_seq + pid_r)
        tok0 = tl.load(row_tok0 + pid_r)
        ntok = tl.load(row_ntok + pid_r)

    # K/V field geometry: PER fields per byte, DP channels per field, ROW bytes per token
    K_PER: tl.constexpr = 1 if (K_BITS == 16 or K_FP8 or K_BITS == 8) else (4 if K_BITS == 3 else 8 // K_BITS)
    V_PER: tl.constexpr = 1 if (V_BITS == 16 or V_FP8 or V_BITS == 8) else (4 if V_BITS == 3 else 8 // V_BITS)
    K_DP: tl.constexpr = D // K_PER
    V_DP: tl.constexpr = D // V_PER
    K_ROW: tl.constexpr = D if (K_BITS == 16 or K_FP8) else D * K_BITS // 8
    V_ROW: tl.constexpr = D if (V_BITS == 16 or V_FP8) else D * V_BITS // 8
    K_SCALED: tl.constexpr = not (K_BITS == 16 or K_FP8)
    V_SCALED: tl.constexpr = not (V_BITS == 16 or V_FP8)

    r = tl.arange(0, M)
    tok = r // GROUP
    rows_ok = (tok < ntok) & (r < TOKS * GROUP)
    tok_idx = tok0 + tok
    qhead = h * GROUP + r % GROUP
    q_off = tok_idx.to(tl.int64) * stride_qt + qhead * stride_qh
    row_lim = tl.load(q_tile + tok_idx, mask=rows_ok, other=0)
    start = tl.load(page_start + b)
    end = tl.max(row_lim, 0)
    per_split = tl.cdiv(tl.maximum(end - start, 0), SPLITS)
    lo = start + pid_s * per_split
    hi = tl.minimum(lo + per_split, end)

    ki = tl.arange(0, K_DP)
    vi = tl.arange(0, V_DP)
    q0 = _q_field(q_ptr, q_off, rows_ok, ki, 0, K_PER, qscale)
    q1 = q0  # placeholders for fields a width does not have (never read)
    q2 = q0
    q3 = q0
    if K_PER > 1:
        q1 = _q_field(q_ptr, q_off, rows_ok, ki, 1, K_PER, qscale)
    if K_PER > 2:
        q2 = _q_field(q_ptr, q_off, rows_ok, ki, 2, K_PER, qscale)
        q3 = _q_field(q_ptr, q_off, rows_ok, ki, 3, K_PER, qscale)
    k_off = tl.load(offsets + h * 4 + tl.arange(0, 4))
    v_off = tl.load(offsets + (num_kv_heads + h) * 4 + tl.arange(0, 4))
    # every field offset is a multiple of 16 bytes (PageLayout checks): lets loads be vectorized
    kc = tl.multiple_of(tl.sum(tl.where(tl.arange(0, 4) == 0, k_off, 0), 0).to(tl.int64), 16)
    ksc = tl.sum(tl.where(tl.arange(0, 4) == 1, k_off, 0), 0).to(tl.int64)
    kz = tl.sum(tl.where(tl.arange(0, 4) == 2, k_off, 0), 0).to(tl.int64)
    kn = tl.sum(tl.where(tl.arange(0, 4) == 3, k_off, 0), 0).to(tl.int64)
    vc = tl.multiple_of(tl.sum(tl.where(tl.arange(0, 4) == 0, v_off, 0), 0).to(tl.int64), 16)
    vsc = tl.sum(tl.where(tl.arange(0, 4) == 1, v_off, 0), 0).to(tl.int64)
    vz = tl.sum(tl.where(tl.arange(0, 4) == 2, v_off, 0), 0).to(tl.int64)
    vn = tl.sum(tl.where(tl.arange(0, 4) == 3, v_off, 0), 0).to(tl.int64)

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    a0 = tl.zeros([M, V_DP], tl.float32)
    a1 = tl.zeros([M, V_DP], tl.float32)
    a2 = tl.zeros([M, V_DP], tl.float32)
    a3 = tl.zeros([M, V_DP], tl.float32)
    brow = block_table + b.to(tl.int64) * bt_stride
    # one flat loop over (tile, sub-tile) steps. The code bytes of a step are left to Triton's
    # software pipeliner (cp.async into shared memory, num_stages deep); its scale vectors are too
    # small for that (< 4 bytes per thread) and were synchronous loads on the critical path: with
    # PREFETCH they are loaded one step ahead into registers
    NSUB: tl.constexpr = G // BT
    step_lo = lo * NSUB
    step_hi = hi * NSUB
    sb = tl.arange(0, BT)
    if PREFETCH:
        # past the end: block 0 (the engine's null block, always allocated) is read and unused
        page_n = tl.load(brow + lo, mask=lo < hi, other=0).to(tl.int64) * page_stride
        sc_n = _scales(f16, page_n, sb, ki, vi, ksc, kz, kn, vsc, vz, vn, K_PER, K_SCALED, K_NORM, V_PER,
                       V_SCALED, V_NORM == 1)
    for step in range(step_lo, step_hi):
        tile = step // NSUB
        t = (step % NSUB) * BT + sb
        page = tl.load(brow + tile).to(tl.int64) * page_stride
        live = tile < row_lim  # [M]: rows whose own tile comes later read this one
        kraw = _raw(u8, f16, page + kc, t, ki, K_ROW, D, K_BITS)
        khi = _raw_hi(u8, page + kc, t, ki, K_ROW, D, K_BITS)
        vraw = _raw(u8, f16, page + vc, t, vi, V_ROW, D, V_BITS)  # issued early: both loads in flight
        vhi = _raw_hi(u8, page + vc, t, vi, V_ROW, D, V_BITS)
        if PREFETCH:
            sc = sc_n
            nxt = step + 1
            page_n = tl.load(brow + nxt // NSUB, mask=nxt < step_hi, other=0).to(tl.int64) * page_stride
            sc_n = _scales(f16, page_n, (nxt % NSUB) * BT + sb, ki, vi, ksc, kz, kn, vsc, vz, vn, K_PER, K_SCALED,
                           K_NORM, V_PER, V_SCALED, V_NORM == 1)
        else:
            sc = _scales(f16, page, t, ki, vi, ksc, kz, kn, vsc, vz, vn, K_PER, K_SCALED, K_NORM, V_PER, V_SCALED,
                         V_NORM == 1)
        m_i, l_i, a0, a1, a2, a3 = _sub_tile(
            kraw, khi, vraw, vhi, sc, ki, vi, live, q0, q1, q2, q3, m_i, l_i, a0, a1, a2, a3,
            K_PER, K_BITS, K_FP8, K_SCALED, K_NORM, V_PER, V_BITS, V_FP8, V_SCALED, V_NORM, CVT)

    inv_l = tl.where(l_i > 0, 1.0 / l_i, 0.0)
    o_off = pid_s.to(tl.int64) * ws_stride_s + (tok_idx.to(tl.int64) * HQ + qhead) * D
    vst = v_static + h * D
    _store_out(ws_o, o_off, rows_ok, a0, vi, vst, 0, V_PER, V_NORM == 2, inv_l)
    if V_PER > 1:
        _store_out(ws_o, o_off, rows_ok, a1, vi, vst, 1, V_PER, V_NORM == 2, inv_l)
    if V_PER > 2:
        _store_out(ws_o, o_off, rows_ok, a2, vi, vst, 2, V_PER, V_NORM == 2, inv_l)
        _store_out(ws_o, o_off, rows_ok, a3, vi, vst, 3, V_PER, V_NORM == 2, inv_l)
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(ws_lse + pid_s.to(tl.int64) * (ws_stride_s // D) + tok_idx.to(tl.int64) * HQ + qhead, lse, mask=rows_ok)


@triton.jit
def _staged_chunk(st_k, st_v, n, qT, m_i, l_i, acc, D: tl.constexpr, G: tl.constexpr):
    t = tl.arange(0, G)
    d = tl.arange(0, D)
    ok = t < n
    k = tl.load(st_k + t[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    s = tl.dot(k.to(tl.float16), qT)  # [G, M]
    s = tl.where(ok[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[None, :])
    alpha = tl.exp2(m_i - m_safe)
    v = tl.load(st_v + t[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(tl.trans(p.to(tl.float16)), v.to(tl.float16))
    return m_new, l_i * alpha + tl.sum(p, 0), acc


@triton.jit(do_not_specialize=["slot_index"])
def _staged_kernel(
    q_ptr, stride_qt, stride_qh, ws_o, ws_lse, slot_index,
    staging, slot_stride, first_slot, cur_slot, cur_len, qscale,
    HQ: tl.constexpr, GROUP: tl.constexpr, M: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    NUM_KV: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.arange(0, M)
    d = tl.arange(0, D)
    rows_ok = r < GROUP
    qhead = h * GROUP + r
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qt + qhead[:, None] * stride_qh + d[None, :],
                mask=rows_ok[:, None], other=0.0).to(tl.float32) * qscale
    qT = tl.trans(q.to(tl.float16))
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    fs = tl.load(first_slot + b)
    if fs >= 0:
        base = staging + fs.to(tl.int64) * slot_stride + h * G * D
        m_i, l_i, acc = _staged_chunk(base, base + NUM_KV * G * D, G, qT, m_i, l_i, acc, D, G)
    n = tl.load(cur_len + b)
    if n > 0:
        base = staging + tl.load(cur_slot + b).to(tl.int64) * slot_stride + h * G * D
        m_i, l_i, acc = _staged_chunk(base, base + NUM_KV * G * D, n, qT, m_i, l_i, acc, D, G)
    inv_l = tl.where(l_i > 0, 1.0 / l_i, 0.0)
    row = (slot_index * tl.num_programs(0) + b).to(tl.int64)  # slot_index may arrive as a constant 1
    o_off = row * HQ * D + qhead * D
    tl.store(ws_o + o_off[:, None] + d[None, :], acc * inv_l[:, None], mask=rows_ok[:, None])
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(ws_lse + row * HQ + qhead, lse, mask=rows_ok)


@triton.jit(do_not_specialize=["T", "NP"])
def _combine_kernel(ws_o, ws_lse, out, lse_out, T, NP, HQ: tl.constexpr, D: tl.constexpr,
                    NPP: tl.constexpr, WRITE_LSE: tl.constexpr):
    t = tl.program_id(0)
    hq = tl.program_id(1)
    s = tl.arange(0, NPP)
    d = tl.arange(0, D)
    ok = s < NP
    lse = tl.load(ws_lse + (s.to(tl.int64) * T + t) * HQ + hq, mask=ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(ok, tl.exp2(lse - m_safe), 0.0)
    o = tl.load(ws_o + ((s.to(tl.int64) * T + t) * HQ + hq)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    tot = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(tot > 0, tot, 1.0)
    tl.store(out + (t.to(tl.int64) * HQ + hq) * D + d, res.to(out.dtype.element_ty))
    if WRITE_LSE:
        # natural-log lse for callers that merge with other parts
        tl.store(lse_out + t.to(tl.int64) * HQ + hq, tl.where(tot > 0, (m_safe + tl.log2(tl.where(tot > 0, tot, 1.0))) / LOG2E_C, float("-inf")))


# ---------------------------------------------------------------------------------------------
def group_launch(layout: PageLayout, k_bits: int, v_bits: int, num_warps: int) -> tuple[dict, int, bool]:
    """The head-group constexprs of ``_paged_kernel``, its warp count, and whether its K is rotated
    (then the kernel gets the rotated query). One place for the launch and ``bench/kernels_ptxas.py``.
    Whether its V is rotated is the launcher's business (``KernelTables.v_rotated``)."""
    fmt = layout.fmt
    kf, vf = stored_form(fmt.k, k_bits), stored_form(fmt.v, v_bits)
    consts = dict(K_BITS=k_bits, K_FP8=kf.fp8, K_NORM=kf.scaled and fmt.k.normalize == "tile",
                  V_BITS=v_bits, V_FP8=vf.fp8,
                  V_NORM={"tile": 1, "static": 2}.get(fmt.v.normalize, 0) if vf.scaled else 0)
    # registers per thread grow with the fields a group unpacks; where the default 2 warps spill
    # (bench/kernels_ptxas.py, sm_90: 3-bit planes, V >= 3 bits, 8-bit heads) give the group more
    if v_bits <= 2 and k_bits in (2, 4):
        warps = num_warps
    elif v_bits <= 4 and k_bits <= 4:
        warps = max(num_warps, 4)
    else:
        warps = max(num_warps, 8)
    return consts, warps, kf.rotated


def _m_rows(rows: int) -> int:
    return max(16, triton.next_power_of_2(rows))


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the H200's, for interpreter runs


def default_splits(batch: int, num_kv_heads: int, max_tiles: int, num_sms: int = 132) -> int:
    """Splits per sequence so that ~4 programs per SM run (fixed by shapes: graph-capture safe).

    ``num_kv_heads``: the heads of the smallest head group (each group is its own launch, and
    launches run one after another: each must fill the GPU; see ``layout_splits``)."""
    want = math.ceil(4 * num_sms / max(1, batch * num_kv_heads))
    return int(max(1, min(MAX_SPLITS, want, max_tiles)))


def layout_splits(layout: PageLayout, batch: int, max_tiles: int, device: torch.device) -> int:
    """``default_splits`` for ``layout``: sized by its smallest head group. A recipe that mixes
    widths launches once per (K, V) width pair; sized by all heads, a 1-head group's launch ran
    B x 1 x 2 programs at B = 64 (under one wave) and the mix took 2x the uniform format's time."""
    smallest = min(len(g.heads) for g in layout.kernel_tables(device).groups)
    return default_splits(batch, smallest, max_tiles, _num_sms(device))


# the decode configuration measured best on the H200 (bench/kernels_gpu.py sweep, 2026-12-02):
# 2 warps, 64-token sub-tiles, 3 cp.async stages, scale vectors prefetched one step ahead
DEFAULTS = dict(bt=64, num_warps=2, num_stages=3, prefetch=True, streams=False)


def default_mma(t: torch.Tensor) -> bool:
    """Whether decode serves K4/V2 head groups with ``mma._mma_kernel`` (compiled CUDA sm_80+ only;
    ``KVARN_DECODE_MMA=0`` turns it off)."""
    return (default_cvt(t) == 2 and os.environ.get("KVARN_DECODE_MMA", "1") != "0"
            and torch.cuda.get_device_capability(t.device)[0] >= 8)


def default_cvt(t: torch.Tensor) -> int:
    """Code→fp16 conversion: inline PTX on compiled CUDA, the plain-Triton exponent trick otherwise."""
    return 2 if t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1" else 1


def _config(layout: PageLayout, bt, num_warps, num_stages, prefetch) -> tuple:
    """(bt, num_warps, num_stages, prefetch) with ``DEFAULTS`` for what is None (bt within the tile)."""
    bt = min(layout.tile, bt or DEFAULTS["bt"])
    return (bt, num_warps or DEFAULTS["num_warps"], num_stages or DEFAULTS["num_stages"],
            DEFAULTS["prefetch"] if prefetch is None else prefetch)


def _launch_paged(layout: PageLayout, pages, q, ws_o, ws_lse, block_table, q_tile, page_start, rows, n_rows,
                  toks, scale, splits, bt, num_warps, num_stages, prefetch, cvt, maxnreg=None, streams=False,
                  mma=False):
    cvt = default_cvt(q) if cvt is None else cvt
    tables = layout.kernel_tables(q.device)
    _, hq, d = q.shape
    h = layout.num_kv_heads
    group = hq // h
    m = _m_rows(toks * group)
    u8 = pages
    f16 = pages.view(torch.float16)
    v_static = tables.v_static if tables.v_static is not None else q.new_zeros(1, dtype=torch.float32)
    row_seq, row_tok0, row_ntok = rows if rows is not None else (q_tile, q_tile, q_tile)
    # the query is rotated once here (one small matmul), not in each program: an fp32 [M, D] x [D, D]
    # dot in the kernel's prologue spilled ~3 KB of registers per thread (ptxas -v, sm_90)
    q_rot = None
    launches = [(grp, *group_launch(layout, grp.k_bits, grp.v_bits, num_warps)) for grp in tables.groups]
    if any(k_rot for *_, k_rot in launches):
        q_rot = torch.matmul(q.float(), tables.hadamard)
    side = _side_streams(q.device, len(launches)) if streams and len(launches) > 1 and q.is_cuda else None
    if side is not None:  # fork: each head group's launch on its own stream, joined below
        forked = torch.cuda.current_stream(q.device)
        ready = torch.cuda.Event()
        ready.record(forked)
    for n, (grp, consts, warps, k_rot) in enumerate(launches):
        qk = q_rot if k_rot else q
        if side is not None:
            side[n].wait_event(ready)
            ctx = torch.cuda.stream(side[n])
            ctx.__enter__()
        if mma and rows is None and toks == 1 and _mma().supports(grp.k_bits, grp.v_bits, consts, d, layout.tile, group):
            _mma().launch((n_rows, len(grp.heads), splits), qk, ws_o, ws_lse, pages, pages.stride(0), tables,
                          grp.heads, v_static, block_table, page_start, q_tile, scale * LOG2E, h, hq, group,
                          layout.tile, splits, consts, maxnreg=maxnreg, pipe=mma == "pipe")
        else:
            _paged_kernel[(n_rows, len(grp.heads), splits)](
                qk, qk.stride(0), qk.stride(1), ws_o, ws_lse, ws_o.stride(0),
                u8, f16, pages.stride(0), tables.offsets, grp.heads, v_static,
                block_table, block_table.stride(0), q_tile, page_start, row_seq, row_tok0, row_ntok,
                scale * LOG2E, h,
                HQ=hq, GROUP=group, TOKS=toks, M=m, D=d, G=layout.tile, BT=bt, SPLITS=splits,
                ROWS_ARE_SEQS=rows is None, CVT=cvt, PREFETCH=bool(prefetch), **consts,
                num_warps=warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}),
            )
        if side is not None:
            ctx.__exit__(None, None, None)
            done = torch.cuda.Event()
            done.record(side[n])
            forked.wait_event(done)


@functools.lru_cache(maxsize=1)
def _mma():
    from . import mma

    return mma


@functools.lru_cache(maxsize=4)
def _stream_pool(device: torch.device, n: int) -> tuple:
    return tuple(torch.cuda.Stream(device) for _ in range(n))


def _side_streams(device: torch.device, n: int) -> tuple:
    """``n`` side streams of ``device`` (created once; the launches of a mix's head groups each fill
    only part of the GPU, so they run side by side; capture-safe: fork/join by events)."""
    pool = _stream_pool(device, max(4, triton.next_power_of_2(n)))
    return pool[:n]


def _swap_basis(tables, x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``x [T, Hq, D]`` float32 with the heads whose V is stored rotated moved between the model's
    and the stored basis (the rotation is symmetric and orthonormal: one function both ways). In
    place where only some heads rotate; shapes are fixed, so CUDA-graph capture is safe."""
    if tables.v_rotated is None:
        return x
    if tables.v_rotated_all:
        return torch.matmul(x, tables.hadamard)
    t, hq, d = x.shape
    xv = x.view(t, num_kv_heads, hq // num_kv_heads, d)
    xv[:, tables.v_rotated] = torch.matmul(xv[:, tables.v_rotated], tables.hadamard)
    return x


def _combine(ws_o, ws_lse, out, lse_out, num_partials):
    _, t, hq, d = ws_o.shape
    _combine_kernel[(t, hq)](ws_o, ws_lse, out, lse_out if lse_out is not None else ws_lse, t, num_partials, HQ=hq,
                             D=d, NPP=triton.next_power_of_2(num_partials),
                             WRITE_LSE=lse_out is not None, num_warps=1)


def decode(layout: PageLayout, pages, staging, q, block_table, page_start, q_tile, first_slot, cur_slot, cur_len,
           scale, out=None, num_splits=None, bt=None, num_warps=None, num_stages=None, cvt=None, workspace=None,
           prefetch=None, maxnreg=None, streams=None, mma=None):
    """See ``reference.decode``. q ``[B, Hq, D]``; int32 metadata ``[B]``; out ``[B, Hq, D]`` (q's dtype).

    ``mma``: K4/V2 head groups through ``mma._mma_kernel`` (True; ``"pipe"``: its variant that
    copies the next tile's bytes ahead into shared memory, not yet measured), the Triton kernel
    (False), or None (``default_mma``).

    ``workspace``: ``(o [splits + 1, B, Hq, D], lse [splits + 1, B, Hq])`` float32 to reuse (its
    first dim fixes the split count), else allocated: bounded by the batch, not the history.
    """
    bsz, hq, d = q.shape
    if workspace is not None:
        ws_o, ws_lse = workspace
        splits = ws_o.shape[0] - 1
    else:
        splits = num_splits or layout_splits(layout, bsz, block_table.shape[1], q.device)
        ws_o = torch.empty(splits + 1, bsz, hq, d, dtype=torch.float32, device=q.device)
        ws_lse = torch.empty(splits + 1, bsz, hq, dtype=torch.float32, device=q.device)
    cfg = _config(layout, bt, num_warps, num_stages, prefetch)
    _launch_paged(layout, pages, q, ws_o, ws_lse, block_table, q_tile, page_start, None, bsz, 1, scale, splits,
                  *cfg, cvt, maxnreg=maxnreg, streams=DEFAULTS["streams"] if streams is None else streams,
                  mma=default_mma(q) if mma is None else mma)
    group = hq // layout.num_kv_heads
    _staged_kernel[(bsz, layout.num_kv_heads)](
        q, q.stride(0), q.stride(1), ws_o, ws_lse, splits, staging, staging.stride(0), first_slot, cur_slot,
        cur_len, scale * LOG2E, HQ=hq, GROUP=group, M=_m_rows(group), D=d, G=layout.tile,
        NUM_KV=layout.num_kv_heads, num_warps=4)
    if out is None:
        out = torch.empty_like(q)
    tables = layout.kernel_tables(q.device)
    if tables.v_rotated is None:
        _combine(ws_o, ws_lse, out, None, splits + 1)
        return out
    # the paged partials of rotated V heads are in the stored basis: bring the staged one there,
    # combine, and un-rotate the sum once
    ws_o[splits] = _swap_basis(tables, ws_o[splits], layout.num_kv_heads)
    res = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    _combine(ws_o, ws_lse, res, None, splits + 1)
    out.copy_(_swap_basis(tables, res, layout.num_kv_heads))
    return out


def paged_attention(layout: PageLayout, pages, q, q_seq, q_tile, page_start, block_table, scale, toks=None,
                    num_splits=1, bt=None, num_warps=None, num_stages=None, cvt=None, poison=False, prefetch=None):
    """See ``reference.paged_attention`` (natural-log lse). Query tokens of a sequence must be contiguous.

    The workspace is ``num_splits x T x Hq x D`` float32: bounded by the step, not the history.
    """
    t_all, hq, d = q.shape
    group = hq // layout.num_kv_heads
    toks = toks or max(1, 16 // group)
    # row blocks: up to ``toks`` consecutive tokens of one sequence (host-side: prefill only)
    seq = q_seq.tolist()
    r_seq, r_tok0, r_n = [], [], []
    i = 0
    while i < t_all:
        j = i
        while j < t_all and j - i < toks and seq[j] == seq[i]:
            j += 1
        r_seq.append(seq[i]); r_tok0.append(i); r_n.append(j - i)
        i = j
    dev = q.device
    rows = tuple(torch.tensor(x, dtype=torch.int32, device=dev) for x in (r_seq, r_tok0, r_n))
    ws_o = torch.empty(num_splits, t_all, hq, d, dtype=torch.float32, device=dev)
    ws_lse = torch.empty(num_splits, t_all, hq, dtype=torch.float32, device=dev)
    if poison:  # tests: an element no program writes shows up as NaN
        ws_o.fill_(float("nan"))
        ws_lse.fill_(float("nan"))
    _launch_paged(layout, pages, q, ws_o, ws_lse, block_table, q_tile.to(torch.int32), page_start.to(torch.int32),
                  rows, len(r_seq), toks, scale, num_splits, *_config(layout, bt, num_warps, num_stages, prefetch), cvt)
    out = torch.full((t_all, hq, d), float("nan"), dtype=torch.float32, device=dev)
    lse = torch.full((t_all, hq), float("nan"), dtype=torch.float32, device=dev)
    _combine(ws_o, ws_lse, out, lse, num_splits)
    return _swap_basis(layout.kernel_tables(dev), out, layout.num_kv_heads), lse
