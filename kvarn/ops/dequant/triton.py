"""Triton dequant kernel: one program per (tile, head of a group, row block of the tile).

Reads a head's codes and fp16 fields from the page at the byte offsets of
``PageLayout.kernel_tables`` (the layout owns them), computes ``(code * scale + zero) * norm`` in
float32, rotates back with the Hadamard matrix as a ``tl.dot`` (tf32 on the GPU: 10 mantissa bits,
more than the bf16 it is written in) and stores rows ``[BT, D]`` into ``out[t*G + r, h, :]``.
One launch per (K/V, width) head group, the group's widths and fields as constexprs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import PageLayout, _index_tensor, stored_form

NORM_NONE, NORM_TILE, NORM_STATIC = 0, 1, 2


@triton.jit
def _codes(rec, rows, cols, D: tl.constexpr, BITS: tl.constexpr):
    """int32 codes ``[BT, D]`` of tokens ``rows`` from a packed codes field at ``rec`` (see
    ``kvarn.quant.pack``: little-endian streams; 3 bits as a 2-bit plane then a 1-bit plane)."""
    if BITS == 3:
        ROW: tl.constexpr = D * 3 // 8
        lo = tl.load(rec + rows[:, None] * ROW + (cols // 4)[None, :]).to(tl.int32)
        hi = tl.load(rec + rows[:, None] * ROW + D // 4 + (cols // 8)[None, :]).to(tl.int32)
        return ((lo >> ((cols % 4) * 2)[None, :]) & 3) | (((hi >> (cols % 8)[None, :]) & 1) << 2)
    else:
        ROW2: tl.constexpr = D * BITS // 8
        PER: tl.constexpr = 8 // BITS
        b = tl.load(rec + rows[:, None] * ROW2 + (cols // PER)[None, :]).to(tl.int32)
        return (b >> ((cols % PER) * BITS)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _dequant_kernel(u8, f16, page_stride, page_stride16, blocks, heads, offs, vstatic, had, out, s_t, s_h,
                    H: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr, FP8: tl.constexpr,
                    CHANNEL: tl.constexpr, NORM: tl.constexpr, ROTATE: tl.constexpr,
                    G: tl.constexpr, D: tl.constexpr, BT: tl.constexpr):
    t = tl.program_id(0)
    h = tl.load(heads + tl.program_id(1))
    rows = tl.program_id(2) * BT + tl.arange(0, BT)
    cols = tl.arange(0, D)
    blk = tl.load(blocks + t).to(tl.int64)
    field = offs + (KIND * H + h) * 4  # (codes, scale, zero, norm) byte offsets in the record
    codes_at = tl.load(field)
    if BITS == 16:
        x = tl.load(f16 + blk * page_stride16 + codes_at // 2 + rows[:, None] * D + cols[None, :]).to(tl.float32)
    elif FP8:
        raw = tl.load(u8 + blk * page_stride + codes_at + rows[:, None] * D + cols[None, :])
        x = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        c = _codes(u8 + blk * page_stride + codes_at, rows, cols, D, BITS)
        rec16 = f16 + blk * page_stride16
        if CHANNEL:  # K: scale/zero per channel [D]
            scale = tl.load(rec16 + tl.load(field + 1) // 2 + cols).to(tl.float32)[None, :]
            zero = tl.load(rec16 + tl.load(field + 2) // 2 + cols).to(tl.float32)[None, :]
        else:  # V: per token [G]
            scale = tl.load(rec16 + tl.load(field + 1) // 2 + rows).to(tl.float32)[:, None]
            zero = tl.load(rec16 + tl.load(field + 2) // 2 + rows).to(tl.float32)[:, None]
        x = c.to(tl.float32) * scale + zero
        if NORM == 1:  # per tile: K per token, V per channel
            if CHANNEL:
                x = x * tl.load(rec16 + tl.load(field + 3) // 2 + rows).to(tl.float32)[:, None]
            else:
                x = x * tl.load(rec16 + tl.load(field + 3) // 2 + cols).to(tl.float32)[None, :]
        elif NORM == 2:  # V static: the recipe's per-channel multiplier
            x = x * tl.load(vstatic + h * D + cols)[None, :]
        if ROTATE:
            hm = tl.load(had + tl.arange(0, D)[:, None] * D + cols[None, :])
            x = tl.dot(x, hm)
    tl.store(out + (t * G + rows).to(tl.int64)[:, None] * s_t + h * s_h + cols[None, :], x.to(out.dtype.element_ty))


def dequant_tiles(layout: PageLayout, pages: torch.Tensor, block_ids: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``reference.dequant_tiles``."""
    if layout.fmt.k.normalize == "static":  # no such key format today; the tables hold V's multiplier only
        from . import reference

        return reference.dequant_tiles(layout, pages, block_ids, dtype)
    h, g, d = layout.num_kv_heads, layout.tile, layout.head_dim
    n = block_ids.shape[0]
    dev = pages.device
    tabs = layout.kernel_tables(dev)
    blocks = block_ids.to(torch.int64).contiguous()
    pages16 = pages[:, : pages.shape[1] // 2 * 2].view(torch.float16)
    bt = min(g, 32)  # rows per program: a [32, D] float32 block and the [D, D] matrix stay in registers/smem
    res = []
    for kind, tf in (("k", layout.fmt.k), ("v", layout.fmt.v)):
        out = torch.empty(n * g, h, d, dtype=dtype, device=dev)
        res.append(out)
        if n == 0:
            continue
        for bits, heads in layout._by_bits(kind):
            form = stored_form(tf, bits)
            norm = NORM_TILE if tf.normalize == "tile" else NORM_STATIC if tf.normalize == "static" else NORM_NONE
            _dequant_kernel[(n, len(heads), g // bt)](
                pages, pages16, pages.stride(0), pages16.stride(0), blocks, _index_tensor(tuple(heads), dev),
                tabs.offsets, tabs.v_static if tabs.v_static is not None else tabs.offsets,
                tabs.hadamard if tabs.hadamard is not None else tabs.offsets, out, out.stride(0), out.stride(1),
                H=h, KIND="kv".index(kind), BITS=bits,
                FP8=form.fp8, CHANNEL=tf.axis == "channel", NORM=norm if form.scaled else NORM_NONE,
                ROTATE=form.rotated, G=g, D=d, BT=bt, num_warps=4)
    return res[0], res[1]
