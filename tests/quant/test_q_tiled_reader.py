"""The tile-by-tile eval reader (``tiled_attention`` / ``SchemeAttention``) against the reader it
replaced (``kvarn.quant.reference.scheme_attention_ref``: whole-sequence fake quantization, one SDPA
call over doubled keys with a [Tq, 2Tk] mask) and, for soft-capping, a float64 loop written here.

Sizes are irregular on purpose: windows that end inside a tile (t = 200, 333), on a boundary (256),
shorter than one tile (50) or of one token; queries that are only the tail of the keys (a cached
prefix); GQA groups 1 and 3; every preset and a mixed-width scheme with calibrated priors.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvarn.quant.attention import mixed_attention, quantized_read_mask, tiled_attention
from kvarn.quant.formats import LayerFormat, TensorFormat
from kvarn.quant.reference import scheme_attention_ref
from kvarn.quant.scheme import PRESETS, CacheScheme, SchemeAttention, preset_scheme


def _inputs(t, tq, h, groups, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h * groups, tq, d, generator=gen)
    k = torch.randn(1, h, t, d, generator=gen) * 2 + torch.randn(1, h, 1, d, generator=gen)  # channel offsets
    v = torch.randn(1, h, t, d, generator=gen)
    return q, k, v


def _causal(tq, t):
    qp = torch.arange(t - tq, t)
    return torch.where(torch.arange(t)[None, :] <= qp[:, None], 0.0, float("-inf"))[None, None]


def _mixed_scheme(h, d, tile):
    """Per-head widths 2/3/4/8/16 over two layers, clipping, static V scale: a recipe's shape."""
    widths = [(2, 3, 4), (8, 16, 2)]
    layers = [LayerFormat(d, tile, TensorFormat(tuple(w[:h]), "channel", "none", clip=True),
                          TensorFormat(tuple(reversed(w))[:h], "token", "static", clip=True)) for w in widths]
    gen = torch.Generator().manual_seed(3)
    k_prior = torch.randn(2, h, d, generator=gen) * 0.3
    v_prior = torch.randn(2, h, d, generator=gen) * 0.3
    return CacheScheme("mixed", layers, True, k_prior, v_prior)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = [  # t, tq, groups: ids read like t200-q200-g3
    (200, 200, 3), (256, 256, 1), (333, 333, 3), (50, 50, 3), (333, 77, 3), (300, 1, 1), (1, 1, 3),
]


@pytest.mark.parametrize("name", list(PRESETS) + [None])
@pytest.mark.parametrize("t,tq,groups", CASES, ids=[f"t{t}-q{tq}-g{g}" for t, tq, g in CASES])
def test_scheme_attention_matches_previous_reader(name, t, tq, groups):
    h, d = 3 if groups == 1 else 2, 64
    q, k, v = _inputs(t, tq, h, groups, d, seed=t * 7 + tq)
    scheme = None if name is None else preset_scheme(name, 1, h, d)
    bias = _causal(tq, t)
    got = SchemeAttention(scheme).attend(0, q, k, v, bias, 1 / math.sqrt(d))
    ref = scheme_attention_ref(scheme, 0, q, k, v, bias, 1 / math.sqrt(d))
    assert got.shape == ref.shape
    err = _rel(got, ref)
    assert err <= 2e-6, f"{name} t{t} tq{tq}: tiled reader vs previous reader, relative RMS error {err:.2e} > 2e-6"


@pytest.mark.parametrize("tile", [64, 128])
@pytest.mark.parametrize("t,tq", [(190, 190), (257, 100), (129, 129)])
def test_mixed_width_scheme_matches_previous_reader(tile, t, tq):
    h, d = 3, 64
    q, k, v = _inputs(t, tq, h, 3, d, seed=tile + t)
    scheme = _mixed_scheme(h, d, tile)
    for layer in (0, 1):
        for bias in (_causal(tq, t), None if tq == t else _causal(tq, t)):
            got = SchemeAttention(scheme).attend(layer, q, k, v, bias, 0.11)
            ref = scheme_attention_ref(scheme, layer, q, k, v, _causal(tq, t) if bias is None else bias, 0.11)
            err = _rel(got, ref)
            assert err <= 2e-6, f"layer {layer} tile {tile} t{t} tq{tq} bias={bias is not None}: rel err {err:.2e}"


@pytest.mark.parametrize("tile,keep", [(64, True), (64, False), (1, False)])
def test_tiled_attention_general_k_hat(tile, keep):
    """k_hat unrelated to k (not equal to it outside the quantized span), a sliding-window bias:
    the reading rule alone decides which copy each (query, key) pair reads."""
    t, tq, h, g, d = 230, 150, 2, 3, 64
    q, k, v = _inputs(t, tq, h, g, d, seed=tile)
    gen = torch.Generator().manual_seed(11)
    k_hat, v_hat = torch.randn(k.shape, generator=gen), torch.randn(v.shape, generator=gen)
    qp = torch.arange(t - tq, t)
    kp = torch.arange(t)
    window = (kp[None, :] <= qp[:, None]) & (kp[None, :] > qp[:, None] - 90)
    bias = torch.where(window, 0.0, float("-inf"))[None, None]
    mask = quantized_read_mask(qp, kp, tile, keep)
    for kh, vh in ((k_hat, v_hat), (k_hat, None), (None, v_hat)):
        got = tiled_attention(q, k, v, kh, vh, tile, keep, bias, 0.2)
        ref = mixed_attention(q, k, v, kh, vh, mask, bias, 0.2)
        err = _rel(got, ref)
        assert err <= 2e-6, f"tile {tile} keep {keep} k_hat={kh is not None} v_hat={vh is not None}: rel err {err:.2e}"


def _softcap_ref(q, k16, v16, k_hat, v_hat, tile, keep, scaling, cap):
    """float64: scores of the read copy, scaled, capped by cap*tanh(s/cap), causal, softmax."""
    b, hq, t, d = q.shape
    g = hq // k16.shape[1]
    pos = torch.arange(t)
    qt, kt = pos[:, None] // tile, pos[None, :] // tile
    sel = (kt < qt) & ~((kt == 0) & keep)
    ex = lambda x: x.double().repeat_interleave(g, 1)  # noqa: E731
    s = torch.where(sel, q.double() @ ex(k_hat).transpose(-1, -2), q.double() @ ex(k16).transpose(-1, -2)) * scaling
    s = torch.tanh(s / cap) * cap
    s = s.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    p = torch.softmax(s, -1)
    return (p * sel) @ ex(v_hat) + (p * ~sel) @ ex(v16)


def test_softcap_against_float64():
    t, h, g, d, cap = 300, 2, 2, 64, 5.0
    q, k, v = _inputs(t, t, h, g, d, seed=5)
    q = q * 3  # scores well past the cap, so capping changes the result
    scheme = preset_scheme("kvarn-k2v2-g128", 1, h, d)
    reader = SchemeAttention(scheme, softcap=cap)
    got = reader.attend(0, q, k, v, _causal(t, t), 1 / math.sqrt(d))
    k16, v16 = k.half().float(), v.half().float()
    k_hat, v_hat = reader.quantized_kv(0, k16, v16)
    ref = _softcap_ref(q, k16, v16, k_hat, v_hat, 128, True, 1 / math.sqrt(d), cap)
    err = _rel(got, ref)
    assert err <= 1e-5, f"soft-capped reader vs float64: rel err {err:.2e}"
    uncapped = SchemeAttention(scheme).attend(0, q, k, v, _causal(t, t), 1 / math.sqrt(d))
    assert _rel(uncapped, ref) > 1e-3, "the cap did not change the result: the test would not see it missing"


FORMATS = {  # every kvarn codec path: per-tile normalization with/without prior, static, clip, none
    "k-tile-norm": (TensorFormat((4, 2, 3), "channel", "tile"), True),
    "v-tile-norm": (TensorFormat((2, 2, 8), "token", "tile"), False),
    "k-clip": (TensorFormat((2, 3, 16), "channel", "none", clip=True), False),
    "v-static-clip": (TensorFormat((3, 2, 2), "token", "static", clip=True), True),
    "kivi": (TensorFormat((2, 2, 2), "channel", "none", hadamard=False), False),
    "int4": (TensorFormat((4, 4, 4), "token", "none", hadamard=False, codec="rtn-sym"), False),
}


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("t,tile", [(1000, 128), (333, 64), (64, 64)])
@pytest.mark.parametrize("chunk", [1 << 13, None], ids=["chunked", "default-chunk"])
def test_fake_quantizer_bit_identical_to_previous(name, t, tile, chunk, monkeypatch):
    """The in-place, chunked fake quantizer gives exactly the bits of the previous one (a small
    chunk forces several chunks of one or two tiles)."""
    from kvarn.quant import codec
    from kvarn.quant.codec import fake_quantize_sequence
    from kvarn.quant.reference import fake_quantize_sequence_ref

    if chunk is not None:
        monkeypatch.setattr(codec, "_CHUNK_ELEMENTS", chunk)

    fmt, with_prior = FORMATS[name]
    gen = torch.Generator().manual_seed(t + tile)
    x = (torch.randn(2, 3, t, 64, generator=gen) * torch.rand(1, 3, 1, 64, generator=gen) * 4
         + torch.randn(1, 3, 1, 64, generator=gen)).half().float()
    prior = torch.randn(3, 64, generator=gen) * 0.5 if with_prior or fmt.normalize == "static" else None
    for keep in (True, False):
        got = fake_quantize_sequence(x, fmt, tile, keep, prior)
        ref = fake_quantize_sequence_ref(x, fmt, tile, keep, prior)
        diff = (got != ref).sum().item()
        assert diff == 0, f"{name} t{t} tile {tile} keep {keep}: {diff} elements differ from the previous quantizer"
