"""``ops.decode.causal_attention`` (FlashAttention on CUDA) against its reference, on fresh random,
irregular chunks: odd lengths, GQA groups 1/4/7, head_dim 64/128, bf16 and fp16, loud channels.
Checks the output and the log-sum-exp (what the raw-prefill reader merges the cached past with)."""

from __future__ import annotations

import pytest
import torch

from kvarn.ops.decode import causal_attention, dense_attention
from kvarn.ops.decode import reference as ref

CASES = [(333, 8, 1, 64, torch.bfloat16), (1, 2, 4, 128, torch.float16), (517, 2, 7, 64, torch.float16),
         (2048, 4, 4, 128, torch.bfloat16)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention path needs CUDA (the CPU runs the reference itself)")
@pytest.mark.parametrize("t,h,group,d,dtype", CASES)
def test_causal_attention_matches_reference_on_cuda(t, h, group, d, dtype):
    gen = torch.Generator().manual_seed(t * 7 + d)
    q = torch.randn(t, h * group, d, generator=gen)
    k = torch.randn(t, h, d, generator=gen) * torch.linspace(0.3, 4, d)
    v = torch.randn(t, h, d, generator=gen)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    o, lse = causal_attention(q.cuda(), k.cuda(), v.cuda(), d ** -0.5)
    o_ref, lse_ref = ref.causal_attention(q.float(), k.float(), v.float(), d ** -0.5)
    rel = ((o.cpu() - o_ref).norm() / o_ref.norm()).item()
    assert rel < 2e-2, f"output: relative error {rel:.2e}"
    assert (lse.cpu() - lse_ref).abs().max().item() < 2e-2, "log-sum-exp differs from the reference"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention path needs CUDA (the CPU runs the reference itself)")
@pytest.mark.parametrize("t,n,h,group,dtype", [(333, 1409, 8, 4, torch.bfloat16), (1, 128, 2, 7, torch.float16),
                                               (64, 5, 4, 1, torch.bfloat16)])
def test_dense_attention_matches_reference_on_cuda(t, n, h, group, dtype):
    gen = torch.Generator().manual_seed(t + n)
    q = torch.randn(t, h * group, 128, generator=gen).to(dtype)
    k = (torch.randn(h, n, 128, generator=gen) * torch.linspace(0.3, 4, 128)).to(dtype)
    v = torch.randn(h, n, 128, generator=gen).to(dtype)
    o, lse = dense_attention(q.cuda(), k.cuda(), v.cuda(), 128 ** -0.5)
    o_ref, lse_ref = ref.partial_attention(q.float(), k.float(), v.float(), 128 ** -0.5)
    rel = ((o.cpu() - o_ref).norm() / o_ref.norm()).item()
    assert rel < 2e-2, f"output: relative error {rel:.2e}"
    assert (lse.cpu() - lse_ref).abs().max().item() < 2e-2, "log-sum-exp differs from the reference"


def test_causal_reference_is_causal_softmax():
    """The reference against an explicit masked softmax (float64), with its lse."""
    gen = torch.Generator().manual_seed(3)
    t, h, group, d = 37, 2, 3, 16
    q, k, v = torch.randn(t, h * group, d, generator=gen), torch.randn(t, h, d, generator=gen), torch.randn(t, h, d, generator=gen)
    o, lse = ref.causal_attention(q, k, v, 0.25)
    kk, vv = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) * 0.25
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv)
    torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1).T, rtol=1e-5, atol=1e-5)
