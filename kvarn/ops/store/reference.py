"""Reference store: encode tiles with ``PageLayout.encode`` (kvarn.quant.codec) and write pages."""

from __future__ import annotations

import torch

from ..layout import PageLayout


def store_tiles(layout: PageLayout, pages: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                block_ids: torch.Tensor) -> None:
    """Encode ``n`` completed tiles into ``pages[block_ids, :layout.nbytes]``.

    k, v: ``[n, H, G, D]`` (any float dtype; read as fp16-rounded values, as an engine caches them);
    block_ids: int ``[n]``; pages: uint8 ``[num_blocks, >= layout.nbytes]``.
    """
    if k.shape[0] == 0:
        return
    kf = k.float().half().float().transpose(0, 1)
    vf = v.float().half().float().transpose(0, 1)
    pages[block_ids.long(), : layout.nbytes] = layout.encode(kf, vf)
