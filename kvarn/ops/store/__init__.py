"""Store op: encode completed tiles of one layer (all heads) into their pages, in one launch."""

from __future__ import annotations

import torch

from .. import backend
from ..layout import PageLayout
from . import reference


def store_tiles(layout: PageLayout, pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                block_ids: torch.Tensor) -> None:
    """See ``reference.store_tiles``; the Triton kernel on CUDA."""
    if backend(pages) == "triton":
        from . import triton as impl
    else:
        impl = reference
    impl.store_tiles(layout, pages, k, v, block_ids)
