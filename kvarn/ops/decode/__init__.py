"""Decode op: attention of query rows over their sequence's packed pages plus the fp16 part.

``paged_attention`` (any number of query rows per sequence: decode and prefill continuation) and
``decode`` (one row per sequence, staged fp16 part fused) run the Triton kernels on CUDA and the
PyTorch reference elsewhere (``kvarn.ops.backend``). ``partial_attention`` and ``merge`` are the
small exact pieces a caller combines them with.
"""

from __future__ import annotations

from .. import backend
from . import reference
from .reference import merge, partial_attention

__all__ = ["decode", "merge", "paged_attention", "partial_attention"]


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
