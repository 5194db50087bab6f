"""Decode op: attention of query rows over their sequence's packed pages plus the fp16 part.

``paged_attention`` (any number of query rows per sequence: decode and prefill continuation) and
``decode`` (one row per sequence, staged fp16 part fused) run the Triton kernels on CUDA and the
PyTorch reference elsewhere (``kvarn.ops.backend``). ``partial_attention`` and ``merge`` are the
small exact pieces a caller combines them with.

The Triton kernels cover power-of-two head_dim without soft-capping; a layer with head_dim 80/96
or a ``softcap`` runs the reference op instead (on the same device), with a one-line warning once
per process and reason (``kvarn.ops.triton_unsupported``).
"""

from __future__ import annotations

from .. import backend, triton_unsupported
from . import reference
from .reference import merge, partial_attention

__all__ = ["decode", "merge", "paged_attention", "partial_attention"]


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
