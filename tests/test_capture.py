"""Capture: streaming statistics equal a direct computation; NaN input is a clear error."""

import pytest
import torch

from kvarn.capture import CaptureConfig, KVCapture
from kvarn.errors import KvarnError
from kvarn.quant.formats import TensorFormat
from kvarn.quant.hadamard import hadamard_matrix

CFG = CaptureConfig(tile=64, keep_first_tile=True, k=TensorFormat((), "channel", "none", clip=True),
                    v=TensorFormat((), "token", "static", clip=True), query_stride=2)


def _causal(t):
    pos = torch.arange(t)
    return torch.zeros(t, t).masked_fill(pos[None, :] > pos[:, None], float("-inf"))[None, None]


def test_streaming_log_std_matches_direct_float64():
    cap = KVCapture(num_layers=2, num_kv_heads=2, head_dim=64, cfg=CFG)
    g = torch.Generator().manual_seed(0)
    chunks = []
    for _ in range(3):
        q = torch.randn(1, 4, 256, 64, generator=g)
        k = torch.randn(1, 2, 256, 64, generator=g) * torch.linspace(0.1, 3, 64)
        v = torch.randn(1, 2, 256, 64, generator=g)
        cap.attend(1, q, k, v, _causal(256), 0.125)
        chunks.append(k.half().double())
    h = hadamard_matrix(64, dtype=torch.float64)
    allk = torch.cat(chunks, dim=2)[0] @ h  # [H, T, D]
    direct = torch.log(allk.std(dim=1, unbiased=False))
    assert torch.allclose(cap.log_std("k", 1).double(), direct, atol=1e-4), "k log_std"
    assert cap.count[0] == 0 and cap.count[1] == 3 * 256


def test_candidate_errors_shrink_with_bits():
    cap = KVCapture(num_layers=1, num_kv_heads=2, head_dim=64, cfg=CFG)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 320, 64, generator=g)
    k = torch.randn(2, 2, 320, 64, generator=g) * 2
    v = torch.randn(2, 2, 320, 64, generator=g)
    cap.attend(0, q, k, v, _causal(320), 0.125)
    for kind in "kv":
        mse = cap.mse[kind][0]  # [H, nb] for bits 2, 3, 4, 8
        assert (mse[:, :-1] > mse[:, 1:]).all(), f"{kind} mse not decreasing in bits: {mse}"
        assert (mse > 0).all()


def test_heads_are_measured_independently():
    """Quantizing all heads at once gives each head's own error: head 1's inputs don't move head 0."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 256, 64, generator=g)
    k = torch.randn(1, 2, 256, 64, generator=g)
    v = torch.randn(1, 2, 256, 64, generator=g)
    a = KVCapture(1, 2, 64, CFG)
    a.attend(0, q, k, v, _causal(256), 0.125)
    k2, v2 = k.clone(), v.clone()
    k2[:, 1] *= 7.0
    v2[:, 1] += 3.0
    b = KVCapture(1, 2, 64, CFG)
    b.attend(0, q, k2, v2, _causal(256), 0.125)
    assert torch.allclose(a.mse["k"][0, 0], b.mse["k"][0, 0], rtol=1e-4)
    assert not torch.allclose(a.mse["k"][0, 1], b.mse["k"][0, 1], rtol=1e-2)


@pytest.mark.parametrize("which", ["queries", "keys", "values"])
def test_nan_in_activations_is_a_clear_error(which):
    cap = KVCapture(1, 2, 64, CFG)
    t = {"queries": torch.randn(1, 4, 200, 64), "keys": torch.randn(1, 2, 200, 64), "values": torch.randn(1, 2, 200, 64)}
    t[which][0, 0, 5, 3] = float("nan")
    with pytest.raises(KvarnError) as ei:
        cap.attend(0, t["queries"], t["keys"], t["values"], _causal(200), 0.125)
    assert which in str(ei.value) and "NaN" in str(ei.value) and "\n" not in str(ei.value)
