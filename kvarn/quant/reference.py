"""The eval reader before issue 11, kept as the reference the tiled reader is tested against.

``scheme_attention_ref`` is what ``SchemeAttention.attend`` computed until the tile-by-tile reader
replaced it: fake-quantize the whole sequence, then one SDPA call over every key twice (quantized,
then exact) with a ``[Tq, 2 Tk]`` mask choosing one copy per (query, key) — the reading rule spelled
out as a mask. Slow (the doubled keys and the mask cost ~4x a plain pass at 4k tokens), exact.
"""

from __future__ import annotations

import torch

from .attention import mixed_attention, quantized_read_mask
from .codec import fake_quantize_sequence


def scheme_attention_ref(scheme, layer_idx: int, q, k, v, bias, scaling) -> torch.Tensor:
    """Attention ``[B, Hq, Tq, D]`` of one layer read as ``scheme`` (a ``CacheScheme`` or None) stores it."""
    k16, v16 = k.float().half().float(), v.float().half().float()
    if scheme is None:
        return mixed_attention(q, k16, v16, None, None, None, bias, scaling)
    fmt = scheme.layers[layer_idx]
    kp = None if scheme.k_log_std is None else scheme.k_log_std[layer_idx]
    vp = None if scheme.v_log_std is None else scheme.v_log_std[layer_idx]
    k_hat = fake_quantize_sequence(k16, fmt.k, fmt.tile, scheme.keep_first_tile, kp, scheme.iters)
    v_hat = fake_quantize_sequence(v16, fmt.v, fmt.tile, scheme.keep_first_tile, vp, scheme.iters)
    t = k.shape[-2]
    pos = torch.arange(t, device=k.device)
    mask = quantized_read_mask(pos[t - q.shape[-2]:], pos, fmt.tile, scheme.keep_first_tile)
    return mixed_attention(q, k16, v16, k_hat, v_hat, mask, bias, scaling)
