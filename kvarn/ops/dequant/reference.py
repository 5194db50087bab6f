"""Reference dequant: ``PageLayout.decode`` of the records, as token rows."""

from __future__ import annotations

import torch

from ..layout import PageLayout


def dequant_tiles(layout: PageLayout, pages: torch.Tensor, block_ids: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, v)`` ``[n * G, H, D]`` in ``dtype``, the model's basis: tile ``i`` of ``block_ids``
    (int ``[n]``) gives rows ``i*G .. i*G + G - 1``. pages: uint8 ``[num_blocks, >= layout.nbytes]``."""
    h, d = layout.num_kv_heads, layout.head_dim
    k, v = layout.decode(pages[block_ids.long()])  # [H, n, G, D] float32
    return (k.reshape(h, -1, d).transpose(0, 1).to(dtype).contiguous(),
            v.reshape(h, -1, d).transpose(0, 1).to(dtype).contiguous())
