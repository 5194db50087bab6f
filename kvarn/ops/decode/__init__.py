"""Decode op: attention of query rows over their sequence's packed pages plus the fp16 part.

``paged_attention`` (any number of query rows per sequence: decode and prefill continuation) and
``decode`` (one row per sequence, staged fp16 part fused) run the Triton kernels on CUDA and the
PyTorch reference elsewhere (``kvarn.ops.backend``). ``partial_attention`` and ``merge`` are the
small exact pieces a caller combines them with; ``causal_attention`` is plain causal attention over
a chunk's own fp16/bf16 keys with its log-sum-exp (FlashAttention on CUDA).

The Triton kernels cover power-of-two head_dim without soft-capping; a layer with head_dim 80/96
or a ``softcap`` runs the reference op instead (on the same device), with a one-line warning once
per process and reason (``kvarn.ops.triton_unsupported``). FlashAttention has no cap either: with
``softcap`` the two dense ops take their reference too.
"""

from __future__ import annotations

import torch

from .. import backend, triton_unsupported
from . import reference
from .reference import merge, partial_attention

__all__ = ["causal_attention", "decode", "dense_attention", "merge", "paged_attention", "partial_attention"]


def _impl(t, layout, softcap):
    if backend(t) == "triton" and not triton_unsupported("decode", layout.head_dim, softcap):
        from . import triton as impl

        return impl
    return reference


def paged_attention(layout, pages, q, q_seq, q_tile, page_start, block_table, scale, softcap=None):
    """See ``reference.paged_attention``: ``(o [T, Hq, D], lse [T, Hq])`` float32, natural-log lse."""
    impl = _impl(pages, layout, softcap)
    extra = {"softcap": softcap} if impl is reference else {}
    return impl.paged_attention(layout, pages, q, q_seq, q_tile, page_start, block_table, scale, **extra)


def decode(layout, pages, staging, q, block_table, page_start, q_tile, first_slot, cur_slot, cur_len, scale,
           softcap=None):
    """See ``reference.decode``."""
    impl = _impl(pages, layout, softcap)
    extra = {"softcap": softcap} if impl is reference else {}
    return impl.decode(layout, pages, staging, q, block_table, page_start, q_tile, first_slot, cur_slot, cur_len,
                       scale, **extra)


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


def causal_attention(q, k, v, scale, softcap=None):
    """Causal attention of a chunk over its own keys: q ``[T, Hq, D]``, k/v ``[T, H, D]`` (GQA) →
    ``(o [T, Hq, D], lse [T, Hq])`` float32, natural-log lse (to merge with the chunk's past).

    CUDA: torch's FlashAttention kernel (fp16/bf16; the square causal mask needs no alignment
    convention); elsewhere, or with ``softcap``, ``reference.causal_attention``."""
    if _flash_ok(q) and not softcap:
        return _flash(q, k.transpose(0, 1), v.transpose(0, 1), scale, True)
    return reference.causal_attention(q, k, v, scale, softcap)


def dense_attention(q, k, v, scale, softcap=None):
    """Every query over every key (a chunk over its cached past): q ``[T, Hq, D]``, k/v ``[H, N, D]``
    → ``(o, lse)`` float32. CUDA: FlashAttention (fp16/bf16); elsewhere, or with ``softcap``,
    ``partial_attention``."""
    if _flash_ok(q) and k.shape[1] > 0 and not softcap:
        return _flash(q, k, v, scale, False)
    return partial_attention(q, k, v, scale, softcap=softcap)
