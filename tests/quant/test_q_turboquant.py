"""kvarn.quant.turboquant (vLLM 0.26's TurboQuant KV formats) against float64 references written here.

* centroids: the Lloyd-Max conditions checked by float64 numerical integration (not the closed form
  the code iterates), and the classic Max (1960) table for N(0, 1) at 2 and 3 bits;
* keys: per token in float64 — norm, unit vector, Sylvester-Hadamard built here with ``kron``,
  nearest centroid by distance (not by midpoints), renormalized, rotated back, times the fp16 norm
  (rounded with ``struct``). Tokens with a coordinate within 1e-5 of a cell boundary are skipped
  (float32 vs float64 may pick either neighbour there);
* values: per token in float64 — min/max, floor((v - min)/scale + 1/2), fp16 scale and zero;
* the preset schemes' bytes per token against vLLM's slot size written out from its definition,
  and the layers left at 16 bits.
Inputs are fresh random, irregular (37 tokens, heavy tails, a zero key, D = 64 and 128).
"""

from __future__ import annotations

import math
import struct

import pytest
import torch

from kvarn.quant import turboquant as tq
from kvarn.quant.codec import fake_quantize_sequence
from kvarn.quant.formats import bytes_per_token
from kvarn.quant.scheme import preset_scheme


def fp16(v: float) -> float:
    return struct.unpack("<e", struct.pack("<e", v))[0]


def hadamard64(d: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.kron(h, base)
    return h / math.sqrt(d)


def cell_means(cents: list[float], d: int) -> list[float]:
    """float64 conditional means of N(0, 1/d) on the cells of ``cents`` (boundaries at midpoints),
    by the trapezoid rule on 20001 points per cell (tails cut at 12 sigma)."""
    sigma = 1 / math.sqrt(d)
    edges = [-12 * sigma] + [(a + b) / 2 for a, b in zip(cents, cents[1:])] + [12 * sigma]
    out = []
    for a, b in zip(edges, edges[1:]):
        x = torch.linspace(a, b, 20001, dtype=torch.float64)
        w = torch.exp(-0.5 * (x / sigma) ** 2)
        out.append((torch.trapezoid(x * w, x) / torch.trapezoid(w, x)).item())
    return out


@pytest.mark.parametrize("d,bits", [(64, 3), (64, 4), (128, 3), (128, 4), (256, 2)])
def test_centroids_satisfy_lloyd_max_conditions(d, bits):
    """Each centroid is the float64 conditional mean of its cell: the Lloyd-Max fixed point, which
    for a Gaussian (log-concave) is the unique optimum."""
    got = list(tq.lloyd_max_centroids(d, bits))
    sigma = 1 / math.sqrt(d)
    assert len(got) == 2**bits and got == sorted(got)
    err = max(abs(a - b) for a, b in zip(got, cell_means(got, d))) / sigma
    assert err < 1e-7, f"D={d} {bits}-bit: centroids off their cells' conditional means by {err:.2e} sigma"


@pytest.mark.parametrize("bits,table", [(2, [0.4528, 1.5104]), (3, [0.2451, 0.7560, 1.3440, 2.1520])])
def test_centroids_match_max_1960(bits, table):
    got = [c * math.sqrt(64) for c in tq.lloyd_max_centroids(64, bits)]
    half = got[len(got) // 2:]
    assert all(abs(a - b) < 1e-3 for a, b in zip(half, table)), f"{bits}-bit: {half} vs Max's table {table}"
    assert all(abs(a + b) < 1e-12 for a, b in zip(got, reversed(got))), "centroids not symmetric"


def _keys(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x / torch.rand(shape, generator=gen, dtype=torch.float64).clamp_min(0.05) ** 0.5  # heavy tails
    x = x + 3 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)  # a channel offset, like RoPE'd keys
    x[..., 5, :] = 0.0  # a zero vector
    return x.float().half().float()


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [3, 4])
def test_keys_against_float64_reference(d, bits):
    x = _keys((2, 3, 37, d), seed=d + bits)
    got = tq.fake_quantize_keys(x, bits).double()
    cents = torch.tensor(tq.lloyd_max_centroids(d, bits), dtype=torch.float64)  # checked above
    h = hadamard64(d)
    checked = 0
    for idx in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(37)).tolist():
        k = x[tuple(idx)].double()
        n = k.norm().item()
        y = (k / (n + 1e-8)) @ h
        dist = (y[:, None] - cents[None, :]).abs()
        two = dist.topk(2, largest=False).values
        if ((two[:, 1] - two[:, 0]) < 1e-5).any():
            continue  # on a cell boundary
        c = cents[dist.argmin(-1)]
        ref = (c / c.norm()) @ h * fp16(n)
        err = (got[tuple(idx)] - ref).abs().max().item()
        assert err <= 1e-5 * max(n, 1.0), f"token {idx} D={d} {bits}-bit: max |diff| {err:.2e} (norm {n:.3g})"
        checked += 1
    assert checked >= 150, f"only {checked} of 222 tokens away from cell boundaries"
    assert got[:, :, 5].abs().max() == 0, "a zero key must read back as zero"


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bits", [3, 4])
def test_values_against_float64_reference(d, bits):
    x = _keys((3, 37, d), seed=100 + d + bits)
    x[1, 7] = 0.25  # a constant token: scale at its floor
    got = tq.fake_quantize_values(x, bits).double()
    levels = 2**bits - 1
    skipped = 0
    for t in range(3):
        for i in range(37):
            v = x[t, i].double()
            lo, hi = v.min().item(), v.max().item()
            scale = max((hi - lo) / levels, 1e-8)
            u = (v - lo) / scale + 0.5
            if ((u - u.round()).abs() < 1e-4).any() and hi > lo:
                skipped += 1
                continue  # a code on a rounding edge: float32 may go either way
            codes = torch.floor(u).clamp(0, levels)
            ref = codes * fp16(scale) + fp16(lo)
            err = (got[t, i] - ref).abs().max().item()
            assert err <= 1e-6 * max(abs(lo), abs(hi), 1.0), f"token ({t}, {i}) D={d} {bits}-bit: max |diff| {err:.2e}"
    assert skipped < 20


def slot_bytes(d: int, kb: int, vb: int) -> int:
    """vLLM 0.26 TurboQuantConfig.slot_size_aligned, written out from its definition."""
    key = d if kb == 8 else math.ceil(d * kb / 8) + 2
    s = key + math.ceil(d * vb / 8) + 4
    return s + s % 2


@pytest.mark.parametrize("name", list(tq.PRESETS))
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("layers", [30, 3, 1])
def test_preset_bytes_and_skipped_layers(name, d, layers):
    h = 3
    kb, vb = tq.PRESETS[name]
    s = preset_scheme(name, layers, h, d)
    skipped = {0, 1, layers - 2, layers - 1} if layers >= 4 else set(range(layers // 2)) | set(range(layers - layers // 2, layers))
    for i, lf in enumerate(s.layers):
        want = 2 * h * d * 2 if i in skipped else h * slot_bytes(d, kb, vb)
        assert bytes_per_token(lf) == want, f"{name} D={d} layer {i}/{layers}: {bytes_per_token(lf)} bytes/token != {want}"
    total = sum(2 * h * d * 2 if i in skipped else h * slot_bytes(d, kb, vb) for i in range(layers))
    assert s.bits_per_element() == pytest.approx(8 * total / (layers * 2 * h * d), rel=1e-12)
    assert s.tile == 1 and s.fp16_tokens_per_sequence() == 0


def test_k3v4_real_cost_on_smollm2_shape():
    """30 layers, 3 KV heads, head_dim 64: 26 layers of 62-byte slots + 4 layers at 16 bits."""
    s = preset_scheme("turboquant-k3v4-nc", 30, 3, 64)
    assert s.bits_per_element() == pytest.approx((26 * 62 + 4 * 256) * 8 / (30 * 128))


def test_sequence_reads_every_token_quantized():
    x = _keys((1, 2, 37, 64), seed=1)
    s = preset_scheme("turboquant-k3v4-nc", 5, 2, 64)
    k = fake_quantize_sequence(x, s.layers[2].k, 1, False)
    assert torch.equal(k, tq.fake_quantize_keys(x, 3))
    assert torch.equal(fake_quantize_sequence(x, s.layers[0].k, 1, False), x), "layer 0 is left at 16 bits"
    k8 = preset_scheme("turboquant-k8v4", 5, 2, 64).layers[2].k
    assert torch.equal(fake_quantize_sequence(x, k8, 1, False), x.to(torch.float8_e4m3fn).float())
