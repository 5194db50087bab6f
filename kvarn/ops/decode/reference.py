"""Reference decode attention (PyTorch, float32), in the basis the kernel works in.

Two parts, merged by their log-sum-exp:

* ``paged_attention``: query rows over the quantized pages of their sequence, tiles
  ``[page_start[b], q_tile[t])``. Heads whose format rotates are read in the rotated basis: the
  query is rotated once, the output un-rotated once (``PageLayout.decode(rotated=True)``).
* ``staged_attention``: the fp16 part of a decode step: each sequence's fp16 first tile (staging
  slot ``first_slot``, -1 when it is read from pages or not kept) and its open tile
  (``cur_slot``, ``cur_len`` tokens, the step's own key already written there).

Log-sum-exps are natural logs; a row with nothing to read gets output 0 and lse -inf.
``softcap`` (Gemma-2's ``attn_logit_softcapping``; None: none): every score ``s = q·k·scale``
becomes ``softcap * tanh(s / softcap)`` before the softmax. The cap acts on each score alone, so
partial attentions over disjoint key sets still merge exactly by their log-sum-exps.
"""

from __future__ import annotations

import torch

from ...quant.hadamard import hadamard_matrix
from ..layout import PageLayout, stored_form

NEG_INF = float("-inf")


def partial_attention(q, k, v, scale, valid=None, softcap=None):
    """q ``[M, Hq, D]``, k/v ``[H, N, D]`` (GQA), valid bool ``[M, N]`` or None → (o, lse)."""
    hq, h = q.shape[1], k.shape[0]
    kk = k.repeat_interleave(hq // h, 0)  # [Hq, N, D]
    vv = v.repeat_interleave(hq // h, 0)
    s = torch.einsum("mhd,hnd->mhn", q.float(), kk.float()) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if valid is not None:
        s = s.masked_fill(~valid[:, None, :], NEG_INF)
    lse = torch.logsumexp(s, -1)  # [M, Hq]
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    p = torch.nan_to_num(p, nan=0.0)
    return torch.einsum("mhn,hnd->mhd", p, vv.float()), lse


def causal_attention(q, k, v, scale, softcap=None):
    """q ``[T, Hq, D]``, k/v ``[T, H, D]``: causal attention of a chunk over its own keys → (o, lse)."""
    t = q.shape[0]
    pos = torch.arange(t, device=q.device)
    return partial_attention(q, k.transpose(0, 1), v.transpose(0, 1), scale, pos[None, :] <= pos[:, None], softcap)


def varlen_attention(q, k, v, cu_q: list[int], cu_k: list[int], scale, softcap=None):
    """Sequences packed along dim 0: q ``[sum n_q, Hq, D]``, k/v ``[sum n_k, H, D]``; sequence ``i`` is
    rows ``cu_q[i]:cu_q[i+1]`` of q and ``cu_k[i]:cu_k[i+1]`` of k/v, its queries the last ``n_q`` of
    its ``n_k`` positions (causal, aligned bottom-right: query ``j`` sees keys ``<= n_k - n_q + j``).
    Returns o ``[sum n_q, Hq, D]`` float32."""
    o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        n_q, n_k = q1 - q0, k1 - k0
        if n_q == 0:
            continue
        pos_q = torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
        valid = torch.arange(n_k, device=q.device)[None, :] <= pos_q
        o[q0:q1] = partial_attention(q[q0:q1], k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1), scale, valid,
                                     softcap)[0]
    return o


def merge(o1, lse1, o2, lse2):
    """Combine two partial attentions over disjoint key sets (natural-log lse)."""
    m = torch.maximum(lse1, lse2)
    m = torch.where(torch.isinf(m), 0.0, m)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    tot = w1 + w2
    o = (o1 * w1[..., None] + o2 * w2[..., None]) / torch.where(tot > 0, tot, 1.0)[..., None]
    return o, m + torch.log(tot)


def paged_attention(layout: PageLayout, pages, q, q_seq, q_tile, page_start, block_table, scale, softcap=None):
    """q ``[T, Hq, D]``; q_seq/q_tile int ``[T]``; page_start int ``[B]``; block_table ``[B, NB]``.

    Returns ``(o [T, Hq, D] float32, lse [T, Hq] float32)`` over the quantized pages.
    """
    t_all, hq, d = q.shape
    h, g = layout.num_kv_heads, layout.tile
    o = torch.zeros(t_all, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((t_all, hq), NEG_INF, dtype=torch.float32, device=q.device)
    had = hadamard_matrix(d, torch.float32, q.device)
    k_rot = [stored_form(layout.fmt.k, b).rotated for b in layout.fmt.k.bits]
    v_rot = [stored_form(layout.fmt.v, b).rotated for b in layout.fmt.v.bits]
    rows_k = torch.tensor(k_rot, device=q.device).repeat_interleave(hq // h)
    rows_v = torch.tensor(v_rot, device=q.device).repeat_interleave(hq // h)
    for b in torch.unique(q_seq).tolist():
        rows = torch.nonzero(q_seq == b).flatten()
        lim = q_tile[rows].long()
        start, end = int(page_start[b]), int(lim.max())
        if end <= start:
            continue
        kh, vh = layout.decode(pages[block_table[b, start:end].long()], rotated=True)  # [H, n, G, D]
        kh, vh = kh.reshape(h, -1, d), vh.reshape(h, -1, d)
        qb = q[rows].float()
        qb = torch.where(rows_k[None, :, None], qb @ had, qb)
        tile_of = torch.arange(start, end, device=q.device).repeat_interleave(g)
        ob, lb = partial_attention(qb, kh, vh, scale, tile_of[None, :] < lim[:, None], softcap)
        o[rows] = torch.where(rows_v[None, :, None], ob @ had, ob)
        lse[rows] = lb
    return o, lse


def staged_attention(staging, q, first_slot, cur_slot, cur_len, scale, softcap=None):
    """q ``[B, Hq, D]`` (one token per sequence); staging ``[S, 2, H, G, D]`` fp16; slots int ``[B]``."""
    bsz, hq, d = q.shape
    g = staging.shape[3]
    o = torch.zeros(bsz, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((bsz, hq), NEG_INF, dtype=torch.float32, device=q.device)
    for b in range(bsz):
        ks, vs = [], []
        if int(first_slot[b]) >= 0:
            ks.append(staging[int(first_slot[b]), 0])
            vs.append(staging[int(first_slot[b]), 1])
        n = int(cur_len[b])
        if n > 0:
            ks.append(staging[int(cur_slot[b]), 0, :, :n])
            vs.append(staging[int(cur_slot[b]), 1, :, :n])
        if not ks:
            continue
        ob, lb = partial_attention(q[b:b + 1], torch.cat(ks, 1), torch.cat(vs, 1), scale, softcap=softcap)
        o[b], lse[b] = ob[0], lb[0]
    return o, lse


def decode(layout: PageLayout, pages, staging, q, block_table, page_start, q_tile, first_slot, cur_slot, cur_len,
           scale, softcap=None):
    """One query token per sequence → ``[B, Hq, D]`` float32.

    Sequence b reads pages of tiles ``[page_start[b], q_tile[b])`` quantized (``q_tile``: the tile
    its query sits in) and its staged fp16 tokens (``staged_attention``).
    """
    seq = torch.arange(q.shape[0], device=q.device)
    o1, l1 = paged_attention(layout, pages, q, seq, q_tile, page_start, block_table, scale, softcap)
    o2, l2 = staged_attention(staging, q, first_slot, cur_slot, cur_len, scale, softcap)
    return merge(o1, l1, o2, l2)[0]
