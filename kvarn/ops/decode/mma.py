"""Register-fed tensor-core decode (Gluon, ``mma.sync``): the paged part of a decode step for head
groups with 4-bit per-channel keys and 2-bit per-token values (the K4V2 preset and recipes' K4/V2
heads), CUDA sm_80+ only. Computes what ``triton._paged_kernel`` computes for one query token per
sequence (``reference.paged_attention``), writing the same split partials.

Why another kernel: the Triton kernel converts codes in a blocked layout and Triton moves them to
the tensor cores' operand layout through shared memory with barriers (43 barriers per loop body,
``bench/NOTES.md``); it plateaus near 1 TB/s over packed bytes. Here each thread loads exactly the
bytes its ``mma.sync`` fragments need, 16 contiguous bytes per key row and 4 per value row, turns
them into fp16 pairs in registers (``prmt`` + ``lop3`` with the exponent of 1024 + ``fma.f16x2``:
exact), and the fragments go to the tensor cores with no shared memory; only the softmax
probabilities (``BT x 8`` fp16 per sub-tile) are transposed through it.

Orientation: the KV tile is the M side of both products (no padding of the GQA group to 16 rows):
``S^T [BT, NQ] = K [BT, D] @ (q * k_scale)^T`` and ``O^T [D, NQ] += (V * v_norm)^T [D, BT] @ P'``,
``P' = p * v_scale`` per token. The dot's reduction axis may be permuted freely: keys and the query
meet in a channel order chosen so the loaded bytes sit where the fragment wants them
(``_k_channel``), and the values' output channels come out permuted (``_v_channel``) and are put
back at the store. One warp per program; splits as ``triton.default_splits``.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

D_MMA = 128  # head_dim the layouts below are written for
MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]))
A_OP = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2))
B_OP = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2))
# key bytes [BT, 4, 16]: a thread holds 16 contiguous bytes of a row (one 16-byte load); the 4
# threads of a quad hold the row's 4 quarters; 8 quads hold 8 rows
K_RAW = gl.constexpr(gl.BlockedLayout([1, 1, 16], [8, 4, 1], [1, 1, 1], [2, 1, 0]))
# value bytes [BT/2, 8, 4] of even (odd) tokens: a thread holds one 4-byte word of a row
V_RAW = gl.constexpr(gl.BlockedLayout([1, 1, 4], [4, 8, 1], [1, 1, 1], [2, 0, 1]))
# PIPE: a tile's code bytes copied ahead (cp.async) into two stages of shared memory, row-major. A
# thread reads back exactly the bytes it copied (same layouts), so a wait on its own copies suffices
K_SMEM = gl.constexpr(gl.SwizzledSharedLayout(16, 1, 1, [2, 1, 0]))
V_SMEM = gl.constexpr(gl.SwizzledSharedLayout(4, 1, 1, [2, 1, 0]))


def _f16_bits(x: float) -> int:
    return torch.tensor(x, dtype=torch.float16).view(torch.int16).item() & 0xFFFF


def _k_asm(h: int) -> str:
    """4 key bytes (one register, 2 codes each) → bytes ``2h, 2h+1`` as fp16 pairs (low, high nibble)."""
    sel = [0x4040, 0x4141, 0x4242, 0x4343]
    return ("{\n.reg .b32 t0, t1, s, c;\n"
            f"prmt.b32 t0, $2, 0, {sel[2 * h]:#06x};\n"
            f"prmt.b32 t1, $2, 0, {sel[2 * h + 1]:#06x};\n"
            "lop3.b32 t0, t0, 0x00F0000F, 0x64006400, 0xEA;\n"  # lanes 1024 + lo, 1024 + 16 * hi
            "lop3.b32 t1, t1, 0x00F0000F, 0x64006400, 0xEA;\n"
            f"mov.b32 s, {(_f16_bits(1 / 16) << 16) | _f16_bits(1.0):#010x};\n"
            f"mov.b32 c, {(_f16_bits(-64.0) << 16) | _f16_bits(-1024.0):#010x};\n"
            "fma.rn.f16x2 $0, t0, s, c;\n"
            "fma.rn.f16x2 $1, t1, s, c;\n}")


def _v_asm(j: int, y: int) -> str:
    """Value words of an even and an odd token ($2, $3) → field ``j`` of bytes ``2y, 2y+1`` as
    fp16 pairs (even, odd): the token pair a fragment register holds. (Leaving the lanes at
    ``1024 + 4**j * code`` without the ``fma`` and taking the offset off per tile measured no
    faster on the H200, 2026-12-03: the conversion is not what bounds this kernel.)"""
    def sel(byte):
        return byte | byte << 4 | (4 + byte) << 8 | (4 + byte) << 12  # lanes: low byte = a.byte, b.byte
    mask = (3 << (2 * j)) * 0x00010001
    s = _f16_bits(4.0 ** -j)
    c = _f16_bits(-1024.0 * 4.0 ** -j)
    return ("{\n.reg .b32 t0, t1, s, c;\n"
            f"prmt.b32 t0, $2, $3, {sel(2 * y):#06x};\n"
            f"prmt.b32 t1, $2, $3, {sel(2 * y + 1):#06x};\n"
            f"lop3.b32 t0, t0, {mask:#010x}, 0x64006400, 0xEA;\n"  # lanes 1024 + 4**j * code
            f"lop3.b32 t1, t1, {mask:#010x}, 0x64006400, 0xEA;\n"
            f"mov.b32 s, {s << 16 | s:#010x};\n"
            f"mov.b32 c, {c << 16 | c:#010x};\n"
            "fma.rn.f16x2 $0, t0, s, c;\n"
            "fma.rn.f16x2 $1, t1, s, c;\n}")


K_ASM0, K_ASM1 = (gl.constexpr(_k_asm(h)) for h in range(2))
V00, V01, V10, V11, V20, V21, V30, V31 = (gl.constexpr(_v_asm(j, y)) for j in range(4) for y in range(2))


@gluon.jit
def _v_field(ev, od, ASM: gl.constexpr):
    return gl.inline_asm_elementwise(ASM, "=r,=r,r,r", [ev, od], dtype=gl.float16, is_pure=True, pack=4)


@gluon.jit
def _k_channel(k):
    """Actual channel of virtual reduction index ``k`` of the key product (see ``_k_operand``)."""
    return (32 * (((k >> 1) & 1) + 2 * ((k >> 2) & 1)) + 8 * (((k >> 5) & 1) + 2 * ((k >> 6) & 1))
            + 4 * ((k >> 4) & 1) + (k & 1) + 2 * ((k >> 3) & 1))


@gluon.jit
def _v_channel(m):
    """Actual channel of row ``m`` of the value product (see ``_v_operand``)."""
    return 16 * (m & 7) + (m >> 3)


@gluon.jit
def _k_operand(raw, BT: gl.constexpr):
    """Key bytes ``[BT, 4, 16]`` (K_RAW) → the A operand ``[BT, 128]`` fp16 codes in virtual channel
    order, with no data movement: the loaded element (t, a, e) of output half H is channel
    ``32a + 8(e >> 2) + 4H + (e & 3)``; the permute puts the bits the fragment keeps in lanes
    (a) and in register pairs (e & 1) where ``mma.sync`` expects them."""
    lo = gl.inline_asm_elementwise(K_ASM0, "=r,=r,r", [raw], dtype=gl.float16, is_pure=True, pack=4)
    hi = gl.inline_asm_elementwise(K_ASM1, "=r,=r,r", [raw], dtype=gl.float16, is_pure=True, pack=4)
    x = gl.reshape(gl.join(lo, hi), [BT, 2, 2, 2, 2, 2, 2, 2])  # t, a1, a0, e3, e2, e1, e0, H
    x = gl.reshape(gl.permute(x, [0, 3, 4, 7, 5, 1, 2, 6]), [BT, 128])
    return gl.convert_layout(x, A_OP, assert_trivial=True)


@gluon.jit
def _v_operand(ev, od, BT: gl.constexpr):
    """Value words of even/odd tokens ``[BT/2, 8, 4]`` (V_RAW) → the A operand ``[128, BT]`` fp16:
    rows are channels in the order ``_v_channel`` undoes, columns the tokens in order."""
    f00 = _v_field(ev, od, V00)
    f01 = _v_field(ev, od, V01)
    f10 = _v_field(ev, od, V10)
    f11 = _v_field(ev, od, V11)
    f20 = _v_field(ev, od, V20)
    f21 = _v_field(ev, od, V21)
    f30 = _v_field(ev, od, V30)
    f31 = _v_field(ev, od, V31)
    y0 = gl.join(gl.join(f00, f10), gl.join(f20, f30))  # [T2, 8, 4, J0, J1]
    y1 = gl.join(gl.join(f01, f11), gl.join(f21, f31))
    x = gl.reshape(gl.join(y0, y1), [BT // 2, 8, 2, 2, 2, 2, 2])  # t2, g, i1, i0, J0, J1, Y
    x = gl.reshape(gl.permute(x, [6, 2, 5, 4, 1, 0, 3]), [128, BT])
    return gl.convert_layout(x, A_OP, assert_trivial=True)


@gluon.jit
def _scores(kraw, qk, bias, f16, norm_at, tok, J: gl.constexpr, BT: gl.constexpr, NQ: gl.constexpr,
            K_NORM: gl.constexpr):
    """Scores ``[BT, NQ]`` (base 2, scaled) of quarter ``J`` of a tile from its key bytes ``kraw``."""
    s = mma_v2(_k_operand(kraw, BT), qk, gl.zeros([BT, NQ], gl.float32, MMA))
    s = s + bias[None, :]
    if K_NORM:
        s = s * gl.load(f16 + norm_at // 2 + J * BT + tok).to(gl.float32)[:, None]
    return s


@gluon.jit
def _values(ev, od, s, m, part, zp, lp, f16, scale_at, zero_at, tok, J: gl.constexpr, BT: gl.constexpr):
    """Quarter ``J`` of a tile into the tile's partial ``part [128, NQ] += V^T p'`` (p' = p * v_scale),
    ``zp += sum p * v_zero`` and ``lp += sum p`` (p against the tile's running max ``m``)."""
    p = gl.exp2(s - m[None, :])
    vs = gl.load(f16 + scale_at // 2 + J * BT + tok).to(gl.float32)
    vz = gl.load(f16 + zero_at // 2 + J * BT + tok).to(gl.float32)
    pb = gl.convert_layout((p * vs[:, None]).to(gl.float16), B_OP)
    va = _v_operand(ev, od, BT)
    return mma_v2(va, pb, part), zp + gl.sum(p * vz[:, None], 0), lp + gl.sum(p, 0)


@gluon.jit
def _copy_tile(kdst, edst, odst, u8, kbase, vbase, k_rel, v_rel):
    """Start copying one tile's key and value bytes into a stage (one cp.async group)."""
    async_copy.async_copy_global_to_shared(kdst, u8 + kbase + k_rel)
    async_copy.async_copy_global_to_shared(edst, u8 + vbase + v_rel)
    async_copy.async_copy_global_to_shared(odst, u8 + vbase + 32 + v_rel)
    async_copy.commit_group()


@gluon.jit
def _k_quarter(kp, kbuf, stage, J: gl.constexpr, BT: gl.constexpr, PIPE: gl.constexpr):
    if PIPE:
        return kbuf.index(stage).slice(J * BT, BT, dim=0).load(K_RAW)
    else:
        return gl.load(kp + J * BT * 64)


@gluon.jit
def _v_quarter(vp, ebuf, obuf, stage, J: gl.constexpr, BT: gl.constexpr, PIPE: gl.constexpr):
    if PIPE:
        return (ebuf.index(stage).slice(J * BT // 2, BT // 2, dim=0).load(V_RAW),
                obuf.index(stage).slice(J * BT // 2, BT // 2, dim=0).load(V_RAW))
    else:
        return gl.load(vp + J * BT * 32), gl.load(vp + J * BT * 32 + 32)


@gluon.jit(do_not_specialize=["ws_stride_s", "bt_stride", "SPLITS"])
def _mma_kernel(
    q_ptr, stride_qt, stride_qh,
    ws_o, ws_lse, ws_stride_s,
    u8, f16, page_stride,
    offsets, heads, v_static,
    block_table, bt_stride, q_tile, page_start,
    qscale, num_kv_heads,
    HQ: gl.constexpr, GROUP: gl.constexpr, NQ: gl.constexpr, G: gl.constexpr, SPLITS,
    K_NORM: gl.constexpr, V_NORM: gl.constexpr, PIPE: gl.constexpr,
):
    D: gl.constexpr = 128
    BT: gl.constexpr = G // 4  # a tile is read in four quarters
    b = gl.program_id(0)
    h = gl.load(heads + gl.program_id(1))
    pid_s = gl.program_id(2)
    # every field offset is a multiple of 16 bytes (PageLayout checks): lets the code loads be vectorized
    kc = gl.multiple_of(gl.load(offsets + h * 4).to(gl.int64), 16)
    ksc = gl.load(offsets + h * 4 + 1).to(gl.int64)
    kz = gl.load(offsets + h * 4 + 2).to(gl.int64)
    kn = gl.load(offsets + h * 4 + 3).to(gl.int64)
    vc = gl.multiple_of(gl.load(offsets + (num_kv_heads + h) * 4).to(gl.int64), 16)
    vsc = gl.load(offsets + (num_kv_heads + h) * 4 + 1).to(gl.int64)
    vz = gl.load(offsets + (num_kv_heads + h) * 4 + 2).to(gl.int64)
    vn = gl.load(offsets + (num_kv_heads + h) * 4 + 3).to(gl.int64)
    start = gl.load(page_start + b)
    end = gl.load(q_tile + b)
    per_split = gl.cdiv(gl.maximum(end - start, 0), SPLITS)
    lo = start + pid_s * per_split
    hi = gl.minimum(lo + per_split, end)

    # the query as the B operand [128, NQ] (virtual channel order; rows past the group are 0)
    kq = gl.arange(0, D, layout=gl.SliceLayout(1, B_OP))
    nq = gl.arange(0, NQ, layout=gl.SliceLayout(0, B_OP))
    ck = _k_channel(kq)
    q_off = b.to(gl.int64) * stride_qt + (h * GROUP + nq)[None, :] * stride_qh + ck[:, None]
    q_ok = (nq < GROUP)[None, :]
    # key bytes: token t, quarter a, byte e
    kt = gl.arange(0, BT, layout=gl.SliceLayout(1, gl.SliceLayout(2, K_RAW)))
    ka = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, K_RAW)))
    ke = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, K_RAW)))
    k_rel = kt[:, None, None] * 64 + ka[None, :, None] * 16 + ke[None, None, :]
    # value words: token pair t2, word g, byte y
    vt = gl.arange(0, BT // 2, layout=gl.SliceLayout(1, gl.SliceLayout(2, V_RAW)))
    vg = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, V_RAW)))
    vy = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, V_RAW)))
    v_rel = vt[:, None, None] * 64 + vg[None, :, None] * 4 + vy[None, None, :]
    tok = gl.arange(0, BT, layout=gl.SliceLayout(1, MMA))  # per-token vectors of S^T [BT, NQ]
    ch_m = _v_channel(gl.arange(0, D, layout=gl.SliceLayout(1, MMA)))  # rows of O^T [128, NQ]

    m_i = gl.full([NQ], float("-inf"), gl.float32, gl.SliceLayout(0, MMA))
    l_i = gl.zeros([NQ], gl.float32, gl.SliceLayout(0, MMA))
    acc = gl.zeros([D, NQ], gl.float32, MMA)
    brow = block_table + b.to(gl.int64) * bt_stride
    kbuf = 0  # the stages (PIPE only)
    ebuf = 0
    obuf = 0
    if PIPE:
        kbuf = gl.allocate_shared_memory(gl.uint8, [2, G, 4, 16], K_SMEM)
        ebuf = gl.allocate_shared_memory(gl.uint8, [2, G // 2, 8, 4], V_SMEM)
        obuf = gl.allocate_shared_memory(gl.uint8, [2, G // 2, 8, 4], V_SMEM)
        gt = gl.arange(0, G, layout=gl.SliceLayout(1, gl.SliceLayout(2, K_RAW)))
        k_rel_g = gt[:, None, None] * 64 + ka[None, :, None] * 16 + ke[None, None, :]
        gv = gl.arange(0, G // 2, layout=gl.SliceLayout(1, gl.SliceLayout(2, V_RAW)))
        v_rel_g = gv[:, None, None] * 64 + vg[None, :, None] * 4 + vy[None, None, :]
        # past the end: block 0 (the engine's null block, always allocated) is copied and unused
        page0 = gl.load(brow + lo, mask=lo < hi, other=0).to(gl.int64) * page_stride
        _copy_tile(kbuf.index(0), ebuf.index(0), obuf.index(0), u8, page0 + kc, page0 + vc, k_rel_g, v_rel_g)
    for tile in range(lo, hi):
        page = gl.load(brow + tile).to(gl.int64) * page_stride
        stage = (tile - lo) % 2
        if PIPE:
            nxt = gl.load(brow + tile + 1, mask=tile + 1 < hi, other=0).to(gl.int64) * page_stride
            _copy_tile(kbuf.index(1 - stage), ebuf.index(1 - stage), obuf.index(1 - stage), u8, nxt + kc, nxt + vc,
                       k_rel_g, v_rel_g)
            async_copy.wait_group(1)  # this tile's group has landed
        qf = gl.load(q_ptr + q_off, mask=q_ok, other=0.0).to(gl.float32) * qscale
        k_scale = gl.load(f16 + (page + ksc) // 2 + ck).to(gl.float32)
        k_zero = gl.load(f16 + (page + kz) // 2 + ck).to(gl.float32)
        qk = (qf * k_scale[:, None]).to(gl.float16)
        bias = gl.convert_layout(gl.sum(qf * k_zero[:, None], 0), gl.SliceLayout(0, MMA))
        kp = u8 + (page + kc) + k_rel
        # the tile's scores first, in four quarters (one softmax rescale per tile, not per quarter)
        s0 = _scores(_k_quarter(kp, kbuf, stage, 0, BT, PIPE), qk, bias, f16, page + kn, tok, 0, BT, NQ, K_NORM)
        s1 = _scores(_k_quarter(kp, kbuf, stage, 1, BT, PIPE), qk, bias, f16, page + kn, tok, 1, BT, NQ, K_NORM)
        s2 = _scores(_k_quarter(kp, kbuf, stage, 2, BT, PIPE), qk, bias, f16, page + kn, tok, 2, BT, NQ, K_NORM)
        s3 = _scores(_k_quarter(kp, kbuf, stage, 3, BT, PIPE), qk, bias, f16, page + kn, tok, 3, BT, NQ, K_NORM)
        m_new = gl.maximum(m_i, gl.maximum(gl.maximum(gl.max(s0, 0), gl.max(s1, 0)),
                                           gl.maximum(gl.max(s2, 0), gl.max(s3, 0))))
        alpha = gl.exp2(m_i - m_new)
        m_i = m_new
        vp = u8 + (page + vc) + v_rel
        part = gl.zeros([D, NQ], gl.float32, MMA)
        zp = gl.zeros([NQ], gl.float32, gl.SliceLayout(0, MMA))  # sum p * v_zero
        lp = gl.zeros([NQ], gl.float32, gl.SliceLayout(0, MMA))
        ev, od = _v_quarter(vp, ebuf, obuf, stage, 0, BT, PIPE)
        part, zp, lp = _values(ev, od, s0, m_new, part, zp, lp, f16, page + vsc, page + vz, tok, 0, BT)
        ev, od = _v_quarter(vp, ebuf, obuf, stage, 1, BT, PIPE)
        part, zp, lp = _values(ev, od, s1, m_new, part, zp, lp, f16, page + vsc, page + vz, tok, 1, BT)
        ev, od = _v_quarter(vp, ebuf, obuf, stage, 2, BT, PIPE)
        part, zp, lp = _values(ev, od, s2, m_new, part, zp, lp, f16, page + vsc, page + vz, tok, 2, BT)
        ev, od = _v_quarter(vp, ebuf, obuf, stage, 3, BT, PIPE)
        part, zp, lp = _values(ev, od, s3, m_new, part, zp, lp, f16, page + vsc, page + vz, tok, 3, BT)
        l_i = l_i * alpha + lp
        part = part + zp[None, :]
        if V_NORM == 1:  # the tile's channel norms, once per tile
            part = part * gl.load(f16 + (page + vn) // 2 + ch_m).to(gl.float32)[:, None]
        acc = acc * alpha[None, :] + part
    if PIPE:
        async_copy.wait_group(0)
    inv_l = gl.where(l_i > 0, 1.0 / l_i, 0.0)
    out = acc * inv_l[None, :]
    if V_NORM == 2:
        out = out * gl.load(v_static + h * D + ch_m)[:, None]
    n_o = gl.arange(0, NQ, layout=gl.SliceLayout(0, MMA))
    o_ok = n_o < GROUP
    row = b.to(gl.int64) * HQ + h * GROUP + n_o
    gl.store(ws_o + pid_s.to(gl.int64) * ws_stride_s + row[None, :] * D + ch_m[:, None], out, mask=o_ok[None, :])
    lse = gl.where(l_i > 0, m_i + gl.log2(gl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    gl.store(ws_lse + pid_s.to(gl.int64) * (ws_stride_s // D) + row, lse, mask=o_ok)


def supports(k_bits: int, v_bits: int, consts: dict, head_dim: int, tile: int, group: int) -> bool:
    """Whether ``_mma_kernel`` serves a head group (else the Triton kernel does)."""
    return (k_bits == 4 and v_bits == 2 and head_dim == D_MMA and not consts["K_FP8"] and not consts["V_FP8"]
            and tile % 64 == 0 and group <= 16)


def launch(grid, q, ws_o, ws_lse, pages, page_stride, tables, heads, v_static, block_table, page_start, q_tile,
           qscale, num_kv_heads, hq, group, tile, splits, consts, maxnreg=None, pipe=False):
    """One head group's programs ``grid = (B, len(heads), splits)``; the same outputs as ``_paged_kernel``."""
    _mma_kernel[grid](
        q, q.stride(0), q.stride(1), ws_o, ws_lse, ws_o.stride(0),
        pages, pages.view(torch.float16), page_stride, tables.offsets, heads, v_static,
        block_table, block_table.stride(0), q_tile, page_start, qscale, num_kv_heads,
        HQ=hq, GROUP=group, NQ=max(8, 1 << (group - 1).bit_length()), G=tile, SPLITS=splits,
        K_NORM=bool(consts["K_NORM"]), V_NORM=int(consts["V_NORM"]), PIPE=pipe, num_warps=1,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )
