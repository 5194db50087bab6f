"""Reference attention over a tiled, partly quantized cache (PyTorch, float32).

The runtime rule this encodes: a query at position ``p`` reads keys/values of *completed* tiles
(tile index below its own) in their stored, quantized form, and the first tile (if kept) plus its
own open tile in fp16. ``mixed_attention`` evaluates exactly that for a whole sequence in one pass,
so a multi-token forward measures what token-by-token decoding would see.
"""

from __future__ import annotations

import torch


def quantized_read_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, tile: int, keep_first_tile: bool
) -> torch.Tensor:
    """Bool ``[Tq, Tk]``: True where query ``q_pos[i]`` reads key ``k_pos[j]`` quantized."""
    if tile == 1:  # per-token formats quantize on write: every read is quantized
        return torch.ones(len(q_pos), len(k_pos), dtype=torch.bool, device=q_pos.device)
    q_tile = (q_pos // tile)[:, None]
    k_tile = (k_pos // tile)[None, :]
    mask = k_tile < q_tile
    if keep_first_tile:
        mask = mask & (k_tile >= 1)
    return mask


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def mixed_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_hat: torch.Tensor | None, v_hat: torch.Tensor | None,
    read_quantized: torch.Tensor | None, bias: torch.Tensor | None, scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Reference (explicit scores) for ``mixed_attention``: attention ``[B, Hq, Tq, D]`` where reads marked in ``read_quantized [Tq, Tk]`` use
    ``k_hat``/``v_hat`` and the others ``k``/``v`` (all ``[B, H, Tk, D]``, H divides Hq).

    ``bias``: additive mask broadcastable to ``[B, Hq, Tq, Tk]`` (causal/sliding/padding), or None.
    ``k_hat``/``v_hat`` None means that tensor is read exactly. ``softcap`` (Gemma-2's
    ``attn_logit_softcapping``): scores become ``softcap * tanh(scores / softcap)`` before the mask.
    """
    groups = q.shape[1] // k.shape[1]
    qf = q.float()
    scores = qf @ _expand_kv(k.float(), groups).transpose(-1, -2)
    if k_hat is not None:
        scores_q = qf @ _expand_kv(k_hat.float(), groups).transpose(-1, -2)
        scores = torch.where(read_quantized, scores_q, scores)
    scores = scores * scaling
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.float()
    probs = torch.softmax(scores, dim=-1)
    if v_hat is None:
        return probs @ _expand_kv(v.float(), groups)
    mask = read_quantized.to(probs.dtype)
    return (probs * mask) @ _expand_kv(v_hat.float(), groups) + (probs * (1 - mask)) @ _expand_kv(v.float(), groups)


def mixed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_hat: torch.Tensor | None, v_hat: torch.Tensor | None,
    read_quantized: torch.Tensor | None, bias: torch.Tensor | None, scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Same result as ``mixed_attention_ref``, through one fused SDPA call.

    Every key appears twice, quantized then exact (``[k_hat; k]``, length 2Tk), and the mask lets
    each query see exactly one copy of each key; so the softmax runs over the same set of scores.
    ~5x faster on CPU than materialising two score matrices, and it uses GQA without copying K/V.
    SDPA has no soft-capping: with ``softcap`` this is ``mixed_attention_ref``.
    """
    if softcap:
        return mixed_attention_ref(q, k, v, k_hat, v_hat, read_quantized, bias, scaling, softcap)
    q = q.float()
    if k_hat is None and v_hat is None:
        keys, vals, mask = k.float(), v.float(), bias
    else:
        k_hat = k if k_hat is None else k_hat
        v_hat = v if v_hat is None else v_hat
        keys = torch.cat([k_hat.float(), k.float()], dim=-2)
        vals = torch.cat([v_hat.float(), v.float()], dim=-2)
        inf = torch.tensor(float("-inf"), device=q.device)
        zero = torch.tensor(0.0, device=q.device)
        select = torch.cat([torch.where(read_quantized, zero, inf), torch.where(read_quantized, inf, zero)], dim=-1)
        if bias is not None:
            bias = bias.float()
            select = select + torch.cat([bias, bias], dim=-1)
        mask = select
    if mask is not None and mask.dim() == 2:
        mask = mask[None, None]
    if mask is not None:
        mask = mask.float()
    groups = q.shape[1] // keys.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, keys, vals, attn_mask=mask, scale=scaling, enable_gqa=groups > 1
    )


def _causal_rows(q_pos: torch.Tensor, tk: int, device) -> torch.Tensor:
    k_pos = torch.arange(tk, device=device)
    return torch.where(k_pos[None, :] <= q_pos[:, None], 0.0, float("-inf"))


def _capped_attention(q, k, v, bias, scaling: float, softcap: float) -> torch.Tensor:
    """Explicit-score attention with Gemma-2 logit soft-capping: ``softcap * tanh(s / softcap)``
    of the scaled scores, then the additive mask, softmax in float32 (as transformers' eager path)."""
    groups = q.shape[1] // k.shape[1]
    s = (q @ _expand_kv(k, groups).transpose(-1, -2)) * scaling
    s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias
    return torch.softmax(s, dim=-1) @ _expand_kv(v, groups)


def tiled_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_hat: torch.Tensor | None, v_hat: torch.Tensor | None,
    tile: int, keep_first_tile: bool, bias: torch.Tensor | None, scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """``mixed_attention`` with ``read_quantized = quantized_read_mask(...)``, tile by tile.

    Same reading rule: query ``p`` (the last ``Tq`` positions of the ``Tk`` keys) reads keys of
    completed tiles before its own as ``k_hat``/``v_hat`` — except the first tile when
    ``keep_first_tile`` — and its own tile exactly; with ``tile == 1`` every read is quantized.
    ``q [B, Hq, Tq, D]``, ``k, v, k_hat, v_hat [B, H, Tk, D]`` (H divides Hq), ``bias``
    broadcastable to ``[B, Hq, Tq, Tk]`` or None (then causal). ``softcap``: tanh capping of the
    scaled scores before the mask (Gemma-2's ``attn_logit_softcapping``), or None.

    How: the queries of one tile all read the same key set — one buffer holding, for every earlier
    position, the form that tile reads (quantized or the kept first tile exact) and its own tile
    exact. One attention call per query tile over the keys up to that tile's end: no doubled key
    set, no ``[Tq, 2 Tk]`` mask, and the causal upper triangle beyond the tile is never computed
    (about half the score work of one masked call over the whole sequence).
    """
    b, hq, tq, d = q.shape
    tk = k.shape[-2]
    if tq > tk:
        raise ValueError(f"{tq} queries but only {tk} keys: the queries must be the last Tq positions")
    q = q.float()
    k, v = k.float(), v.float()
    groups = hq // k.shape[1]
    q0 = tk - tq  # position of the first query
    if bias is not None:
        bias = bias.float()
        if bias.dim() == 2:
            bias = bias[None, None]

    def attend(qc, kc, vc, mask):
        if softcap:
            return _capped_attention(qc, kc, vc, mask, scaling, softcap)
        return torch.nn.functional.scaled_dot_product_attention(
            qc, kc, vc, attn_mask=mask, scale=scaling, enable_gqa=groups > 1)

    quantized = k_hat is not None or v_hat is not None
    chunk = tile if quantized and tile > 1 else 128  # tile == 1 / exact: chunks only save the upper triangle
    kb = k if not quantized or k_hat is None else k_hat.float().clone()
    vb = v if not quantized or v_hat is None else v_hat.float().clone()
    if quantized and tile > 1 and keep_first_tile:
        g = min(tile, tk)
        if k_hat is not None:
            kb[:, :, :g] = k[:, :, :g]
        if v_hat is not None:
            vb[:, :, :g] = v[:, :, :g]
    swap = quantized and tile > 1
    out = q.new_empty(b, hq, tq, v.shape[-1])
    start = q0
    while start < tk:
        end = min((start // chunk + 1) * chunk, tk)  # the end of this query's tile (or chunk)
        lo = (start // chunk) * chunk  # where that tile starts: its keys are read exactly
        if swap:  # own tile exact; restored below so later tiles read it quantized
            saved_k = kb[:, :, lo:end].clone() if k_hat is not None else None
            saved_v = vb[:, :, lo:end].clone() if v_hat is not None else None
            if k_hat is not None:
                kb[:, :, lo:end] = k[:, :, lo:end]
            if v_hat is not None:
                vb[:, :, lo:end] = v[:, :, lo:end]
        rows = slice(start - q0, end - q0)
        if bias is None:
            mask = _causal_rows(torch.arange(start, end, device=q.device), end, q.device)
        else:
            mask = bias[..., :end] if bias.shape[-2] == 1 else bias[..., rows, :end]
        out[:, :, rows] = attend(q[:, :, rows], kb[:, :, :end], vb[:, :, :end], mask)
        if swap:
            if k_hat is not None:
                kb[:, :, lo:end] = saved_k
            if v_hat is not None:
                vb[:, :, lo:end] = saved_v
        start = end
    return out
