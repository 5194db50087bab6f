"""``ops.decode.varlen_attention`` (a step's prefill chunks over their past and themselves, packed):
the reference against an independent composition (causal attention over the chunk merged with dense
attention over its past, by log-sum-exp), and the CUDA path (vLLM's FlashAttention when vLLM is
there, torch's otherwise) against the reference, on fresh random irregular sequences."""

from __future__ import annotations

import pytest
import torch

from kvarn.ops.decode import varlen_attention
from kvarn.ops.decode import reference as ref


def _packed(gen, lens, h, group, d, dtype=torch.float32):
    """lens: (n_q, n_k) per sequence, n_q <= n_k; loud channels in K."""
    cu_q, cu_k = [0], [0]
    for n_q, n_k in lens:
        cu_q.append(cu_q[-1] + n_q)
        cu_k.append(cu_k[-1] + n_k)
    q = torch.randn(cu_q[-1], h * group, d, generator=gen)
    k = torch.randn(cu_k[-1], h, d, generator=gen) * torch.linspace(0.3, 4, d)
    v = torch.randn(cu_k[-1], h, d, generator=gen)
    return (q.to(dtype), k.to(dtype), v.to(dtype)), cu_q, cu_k


@pytest.mark.parametrize("seed", range(3))
def test_reference_equals_chunk_merged_with_past(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    lens = [(int(torch.randint(1, 40, (1,), generator=gen)), 0) for _ in range(3)]
    lens = [(n_q, n_q + int(torch.randint(0, 70, (1,), generator=gen))) for n_q, _ in lens]
    h, group, d = 2, 3, 16
    (q, k, v), cu_q, cu_k = _packed(gen, lens, h, group, d)
    o = ref.varlen_attention(q, k, v, cu_q, cu_k, d ** -0.5)
    for i, (n_q, n_k) in enumerate(lens):
        qi = q[cu_q[i]:cu_q[i + 1]]
        kc, vc = k[cu_k[i + 1] - n_q:cu_k[i + 1]], v[cu_k[i + 1] - n_q:cu_k[i + 1]]
        o_c, l_c = ref.causal_attention(qi, kc, vc, d ** -0.5)
        if n_k > n_q:
            kp, vp = k[cu_k[i]:cu_k[i + 1] - n_q], v[cu_k[i]:cu_k[i + 1] - n_q]
            o_p, l_p = ref.partial_attention(qi, kp.transpose(0, 1), vp.transpose(0, 1), d ** -0.5)
            o_c, _ = ref.merge(o_c, l_c, o_p, l_p)
        torch.testing.assert_close(o[cu_q[i]:cu_q[i + 1]], o_c, rtol=1e-5, atol=1e-5)


def test_reference_first_query_sees_only_the_past_and_itself():
    gen = torch.Generator().manual_seed(7)
    (q, k, v), cu_q, cu_k = _packed(gen, [(3, 5)], 1, 1, 8)
    v_marked = v.clone()
    v_marked[3:] = 1000.0  # keys after position 2 must not reach query 0 (position 2)
    o = ref.varlen_attention(q, k, v_marked, cu_q, cu_k, 8 ** -0.5)
    assert o[0].abs().max() < 100, "query 0 read a key from its future"
    assert o[2].abs().max() > 100, "the last query did not read its own key"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the FlashAttention paths need CUDA (the CPU runs the reference)")
@pytest.mark.parametrize("path", ["vllm", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lens,h,group,d", [([(517, 517), (1, 2049), (300, 1100)], 8, 4, 128),
                                            ([(33, 161)], 2, 7, 64), ([(128, 128), (64, 64)], 4, 1, 128)])
def test_cuda_matches_reference(lens, h, group, d, dtype, path, monkeypatch):
    """``vllm``: vLLM's FlashAttention varlen call (skipped without vLLM); ``torch``: torch's
    FlashAttention per sequence, chunk and past merged (what runs without vLLM)."""
    import kvarn.ops.decode as ops

    if path == "vllm" and ops._vllm_flash_varlen() is None:
        pytest.skip("vLLM's CUDA build is not importable here")
    if path == "torch":
        monkeypatch.setattr(ops, "_vllm_flash_varlen", lambda: None)
    gen = torch.Generator().manual_seed(sum(a * 3 + b for a, b in lens) + d)
    (q, k, v), cu_q, cu_k = _packed(gen, lens, h, group, d, dtype)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")
    o = varlen_attention(q.cuda(), k.cuda(), v.cuda(), cu_q, cu_k, d ** -0.5, out=out)
    o_ref = ref.varlen_attention(q.float(), k.float(), v.float(), cu_q, cu_k, d ** -0.5)
    assert not torch.isnan(o).any(), "rows left unwritten"
    rel = ((o.float().cpu() - o_ref).norm() / o_ref.norm()).item()
    assert rel < 2e-2, f"relative error {rel:.2e}"
