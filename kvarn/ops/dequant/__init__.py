"""Dequant op: completed tiles of one layer from their pages back to token rows, model basis.

What a prefill chunk reads of the cached past before it attends with FlashAttention over the past
and itself (``kvarn.runtime.paged._read_raw``). The Triton kernel (CUDA) writes the rows in the
attention dtype in one launch per (K/V, width) head group; the reference is
``PageLayout.decode``. head_dim that is not a power of two runs the reference on the same device
(``kvarn.ops.triton_unsupported``).
"""

from __future__ import annotations

import torch

from .. import backend, triton_unsupported
from ..layout import PageLayout
from . import reference


def dequant_tiles(layout: PageLayout, pages: torch.Tensor, block_ids: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``reference.dequant_tiles``; the Triton kernel on CUDA."""
    if backend(pages) == "triton" and not triton_unsupported("dequant", layout.head_dim):
        from . import triton as impl
    else:
        impl = reference
    return impl.dequant_tiles(layout, pages, block_ids, dtype)
