"""Store op: encode completed tiles of one layer (all heads) into their pages, in one launch.

The Triton kernel covers power-of-two head_dim; head_dim 80/96 runs the reference op on the same
device, with a one-line warning once per process (``kvarn.ops.triton_unsupported``).
"""

from __future__ import annotations

import torch

from .. import backend, triton_unsupported
from ..layout import PageLayout
from . import reference


def store_tiles(layout: PageLayout, pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                block_ids: torch.Tensor) -> None:
    """See ``reference.store_tiles``; the Triton kernel on CUDA."""
    if backend(pages) == "triton" and not triton_unsupported("store", layout.head_dim):
        from . import triton as impl
    else:
        impl = reference
    impl.store_tiles(layout, pages, k, v, block_ids)
