"""kvarn.quant.attention against a float64 per-query loop reference written here.

Reference: for every batch b, query head hq (KV head hq // (Hq / H)) and query position p, the
scores over keys j <= p (causal) use k_hat[j] where the read mask is True and k[j] otherwise,
scaled, softmaxed in float64, and the output sums v_hat[j] / v[j] chosen the same way.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvarn.quant.attention import mixed_attention, mixed_attention_ref, quantized_read_mask



def ref_read_quantized(p: int, j: int, tile: int, keep_first: bool) -> bool:
    if tile == 1:
        return True
    if j // tile >= p // tile:  # own (open) tile or later: exact
        return False
    if keep_first and j // tile == 0:
        return False
    return True


def ref_attention(q, k, v, k_hat, v_hat, q_pos, tile, keep_first, scaling):
    b, hq, tq, d = q.shape
    h, tk = k.shape[1], k.shape[2]
    groups = hq // h
    q, k, v = q.double(), k.double(), v.double()
    k_hat = k if k_hat is None else k_hat.double()
    v_hat = v if v_hat is None else v_hat.double()
    out = torch.zeros(b, hq, tq, d, dtype=torch.float64)
    sel_rows = [torch.tensor([ref_read_quantized(int(p), j, tile, keep_first) for j in range(int(p) + 1)])
                for p in q_pos]
    for bi in range(b):
        for qh in range(hq):
            kh = qh // groups
            for i in range(tq):
                p = int(q_pos[i])
                sel = sel_rows[i]  # keys 0..p (causal)
                kk = torch.where(sel[:, None], k_hat[bi, kh, : p + 1], k[bi, kh, : p + 1])
                vv = torch.where(sel[:, None], v_hat[bi, kh, : p + 1], v[bi, kh, : p + 1])
                s = (kk * q[bi, qh, i]).sum(-1) * scaling
                w = torch.exp(s - s.max())
                w = w / w.sum()
                out[bi, qh, i] = (w[:, None] * vv).sum(0)
    return out


def causal_bias(q_pos, tk):
    k_pos = torch.arange(tk)
    return torch.where(k_pos[None, :] <= q_pos[:, None], 0.0, float("-inf"))


CASES = [
    # (B, H, groups, T, Tq, tile, keep_first)
    (1, 2, 3, 77, 77, 64, True),
    (2, 1, 3, 77, 77, 64, False),
    (1, 2, 3, 300, 300, 64, True),
    (1, 1, 3, 300, 40, 64, False),  # last 40 queries only (prefill continuation / decode)
    (1, 2, 1, 130, 1, 64, True),    # single decode query, MHA
    (1, 2, 3, 50, 50, 1, False),    # per-token formats: every read quantized
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("which", ["both", "k_only", "v_only", "exact"])
def test_mixed_attention_matches_loop_reference(case, which):
    b, h, groups, t, tq, tile, keep_first = case
    d = 32
    gen = torch.Generator().manual_seed(t * 7 + tq + tile + groups)
    q = torch.randn(b, h * groups, tq, d, generator=gen)
    k = torch.randn(b, h, t, d, generator=gen)
    v = torch.randn(b, h, t, d, generator=gen)
    k_hat = k + 0.3 * torch.randn(b, h, t, d, generator=gen) if which in ("both", "k_only") else None
    v_hat = v + 0.3 * torch.randn(b, h, t, d, generator=gen) if which in ("both", "v_only") else None
    q_pos = torch.arange(t - tq, t)
    mask = quantized_read_mask(q_pos, torch.arange(t), tile, keep_first)
    bias = causal_bias(q_pos, t)
    scaling = 1 / math.sqrt(d)
    ref = ref_attention(q, k, v, k_hat, v_hat, q_pos, tile, keep_first, scaling)
    for name, fn in (("mixed_attention", mixed_attention), ("mixed_attention_ref", mixed_attention_ref)):
        got = fn(q, k, v, k_hat, v_hat, mask, bias, scaling)
        assert got.shape == ref.shape and got.dtype == torch.float32, f"{name}: {got.dtype} {tuple(got.shape)}"
        err = (got.double() - ref).abs().max().item()
        assert err <= 2e-5, f"{name} ({which}) vs float64 loop reference: max abs err {err:.3e} > 2e-5"
    if which != "exact":
        exact = ref_attention(q, k, v, None, None, q_pos, tile, keep_first, scaling)
        if mask.any():
            assert (ref - exact).abs().max() > 1e-3, "test setup: quantized reads had no effect"
        else:  # e.g. T=77, tile 64, first tile kept: nothing is read quantized yet
            assert (ref - exact).abs().max() == 0


def test_mixed_attention_bias_4d_and_exact_paths():
    gen = torch.Generator().manual_seed(5)
    b, h, g, t, d = 2, 2, 2, 33, 16
    q = torch.randn(b, h * g, t, d, generator=gen)
    k = torch.randn(b, h, t, d, generator=gen)
    v = torch.randn(b, h, t, d, generator=gen)
    q_pos = torch.arange(t)
    bias = causal_bias(q_pos, t)[None, None].expand(b, h * g, t, t).clone()
    mask = quantized_read_mask(q_pos, q_pos, 8, True)
    ref = ref_attention(q, k, v, None, None, q_pos, 8, True, 0.25)
    for name, fn in (("mixed_attention", mixed_attention), ("mixed_attention_ref", mixed_attention_ref)):
        for m in (None, mask):
            got = fn(q, k, v, None, None, m, bias, 0.25)
            err = (got.double() - ref).abs().max().item()
            assert err <= 2e-5, f"{name} exact path (mask {'given' if m is not None else 'None'}): max abs err {err:.3e}"
        # k_hat = k, v_hat = v: quantized reads of identical tensors change nothing
        got = fn(q, k, v, k.clone(), v.clone(), mask, bias, 0.25)
        err = (got.double() - ref).abs().max().item()
        assert err <= 2e-5, f"{name} with k_hat=k, v_hat=v: max abs err {err:.3e}"


def test_quantized_read_mask_by_hand():
    pos = torch.arange(10)
    m = quantized_read_mask(pos, pos, 4, True)
    assert m.dtype == torch.bool and m.shape == (10, 10)
    # query 9 (tile 2): keys 4..7 (tile 1) quantized; keys 0..3 (first tile, kept) and 8..9 (own tile) exact
    assert m[9].tolist() == [False] * 4 + [True] * 4 + [False] * 2, f"row 9 keep_first: {m[9].tolist()}"
    # query 5 (tile 1): nothing completed after the kept first tile
    assert not m[5].any(), f"row 5 keep_first: {m[5].tolist()}"
    m = quantized_read_mask(pos, pos, 4, False)
    assert m[9].tolist() == [True] * 8 + [False] * 2, f"row 9 no keep_first: {m[9].tolist()}"
    assert m[5].tolist() == [True] * 4 + [False] * 6, f"row 5 no keep_first: {m[5].tolist()}"
    assert not m[:4].any(), "queries in tile 0 read something quantized"
    for keep in (True, False):
        assert quantized_read_mask(pos, pos, 1, keep).all(), f"tile=1 keep_first={keep}: not all True"
    # only the last queries
    m = quantized_read_mask(torch.tensor([8, 9]), pos, 4, False)
    assert m.shape == (2, 10) and m.tolist() == [[True] * 8 + [False] * 2] * 2


@settings(max_examples=40, deadline=None)
@given(t=st.integers(1, 40), tile=st.sampled_from([1, 2, 3, 4, 16]), keep=st.booleans(), tq=st.integers(1, 40))
def test_quantized_read_mask_matches_rule(t, tile, keep, tq):
    tq = min(tq, t)
    q_pos = torch.arange(t - tq, t)
    m = quantized_read_mask(q_pos, torch.arange(t), tile, keep)
    ref = [[ref_read_quantized(int(p), j, tile, keep) for j in range(t)] for p in q_pos]
    assert m.tolist() == ref, f"quantized_read_mask(tile={tile}, keep_first={keep}) != rule"
