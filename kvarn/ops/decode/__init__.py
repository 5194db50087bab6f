"""Decode op: attention of query rows over their sequence's packed pages plus the fp16 part.

``paged_attention`` (any number of query rows per sequence: decode and prefill continuation) and
``decode`` (one row per sequence, staged fp16 part fused) run the Triton kernels on CUDA and the
PyTorch reference elsewhere (``kvarn.ops.backend``). ``partial_attention`` and ``merge`` are the
small exact pieces a caller combines them with; ``causal_attention`` is plain causal attention over
a chunk's own fp16/bf16 keys with its log-sum-exp (FlashAttention on CUDA).
"""

from __future__ import annotations

import torch

from .. import backend
from . import reference
from .reference import merge, partial_attention

__all__ = ["causal_attention", "decode", "dense_attention", "merge", "paged_attention", "partial_attention"]


def _impl(t):
    if backend(t) == "triton":
        from . import triton as impl

        return impl
    return reference


def paged_attention(layout, pages, q, q_seq, q_tile, page_start, block_table, scale):
    """See ``reference.paged_attention``: ``(o [T, Hq, D], lse [T, Hq])`` float32, natural-log lse."""
    return _impl(pages).paged_attention(layout, pages, q, q_seq, q_tile, page_start, block_table, scale)


def decode(layout, pages, staging, q, block_table, page_start, q_tile, first_slot, cur_slot, cur_len, scale):
    """See ``reference.decode``."""
    return _impl(pages).decode(layout, pages, staging, q, block_table, page_start, q_tile, first_slot, cur_slot,
                               cur_len, scale)


def _flash(q, k, v, scale, causal):
    """torch's FlashAttention kernel with its log-sum-exp: q ``[T, Hq, D]``, k/v ``[H, N, D]``
    (expanded to the query heads) → float32 ``(o [T, Hq, D], lse [T, Hq])``."""
    hq, h = q.shape[1], k.shape[0]
    qq = q.transpose(0, 1)[None]  # [1, Hq, T, D]
    kk = k.to(q.dtype).repeat_interleave(hq // h, 0)[None]
    vv = v.to(q.dtype).repeat_interleave(hq // h, 0)[None]
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention(qq, kk, vv, 0.0, causal, False, scale=scale)[:2]
    return o[0].transpose(0, 1).float(), lse[0].transpose(0, 1).float()


def _flash_ok(q) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[0] > 0


def causal_attention(q, k, v, scale):
    """Causal attention of a chunk over its own keys: q ``[T, Hq, D]``, k/v ``[T, H, D]`` (GQA) →
    ``(o [T, Hq, D], lse [T, Hq])`` float32, natural-log lse (to merge with the chunk's past).

    CUDA: torch's FlashAttention kernel (fp16/bf16; the square causal mask needs no alignment
    convention); elsewhere ``reference.causal_attention``."""
    if _flash_ok(q):
        return _flash(q, k.transpose(0, 1), v.transpose(0, 1), scale, True)
    return reference.causal_attention(q, k, v, scale)


def dense_attention(q, k, v, scale):
    """Every query over every key (a chunk over its cached past): q ``[T, Hq, D]``, k/v ``[H, N, D]``
    → ``(o, lse)`` float32. CUDA: FlashAttention (fp16/bf16); elsewhere ``partial_attention``."""
    if _flash_ok(q) and k.shape[1] > 0:
        return _flash(q, k, v, scale, False)
    return partial_attention(q, k, v, scale)
