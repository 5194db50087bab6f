"""kvarn.quant.scheme: presets' capacity by hand, unknown names, and SchemeAttention's reading rule.

Hand numbers at head_dim 64 (per KV head and token, K + V, 128 elements):
  kvarn-k4v2-g128: K 4-bit + V 2-bit codes, per-tile scales (see test_q_formats) -> 3.5625 bits
  int4-per-token-head: 2 x (64*4/8 codes + one fp16 scale) = 68 bytes -> 4.25 bits
  fp8-e4m3: one byte per element -> 8.0 bits
"""

from __future__ import annotations

import math

import pytest
import torch

from kvarn.quant.codec import fake_quantize_sequence
from kvarn.quant.scheme import PRESETS, SchemeAttention, preset_scheme



@pytest.mark.parametrize("name,d,bits,tile,fp16_tokens", [
    ("kvarn-k4v2-g128", 64, 3.5625, 128, 255),
    ("kvarn-k4v2-g128", 128, 3.375, 128, 255),
    ("kvarn-k4v4-g128", 64, 4.5625, 128, 255),
    ("kvarn-k2v2-g128", 64, 2.5625, 128, 255),
    ("kvarn-k4v2-g128-nosink", 64, 3.5625, 128, 127),
    ("int4-per-token-head", 64, (2 * (64 * 4 / 8 + 2)) * 8 / 128, 1, 0),
    ("int4-per-token-head", 128, (2 * (128 * 4 / 8 + 2)) * 8 / 256, 1, 0),
    ("kivi-2", 64, 2.375, 128, 127),
    ("fp8-e4m3", 64, 8.0, 1, 0),
    ("fp8-e4m3", 128, 8.0, 1, 0),
])
def test_preset_bits_per_element(name, d, bits, tile, fp16_tokens):
    s = preset_scheme(name, num_layers=3, num_kv_heads=2, head_dim=d)
    assert s.name == name and len(s.layers) == 3 and all(l.num_kv_heads == 2 and l.head_dim == d for l in s.layers)
    got = s.bits_per_element()
    assert got == bits, f"{name} hd{d}: bits/element {got} != {bits}"
    assert s.compression() == 16.0 / bits
    assert s.tile == tile, f"{name}: tile {s.tile} != {tile}"
    assert s.fp16_tokens_per_sequence() == fp16_tokens, f"{name}: fp16 tokens {s.fp16_tokens_per_sequence()}"
    assert s.keep_first_tile == (fp16_tokens == 2 * tile - 1), f"{name}: keep_first_tile {s.keep_first_tile}"


def test_int4_per_token_head_anchor():
    assert preset_scheme("int4-per-token-head", 2, 4, 64).bits_per_element() == 4.25


@pytest.mark.parametrize("name", ["int8", "kivi-4", "fp16", "", "KVARN-K4V2-G128"])
def test_unknown_preset_raises_listing_valid_names(name):
    with pytest.raises(ValueError) as ei:
        preset_scheme(name, 2, 2, 64)
    msg = str(ei.value)
    assert repr(name) in msg or name in msg, f"message does not name {name!r}: {msg!r}"
    assert all(p in msg for p in PRESETS), f"message does not list every valid preset: {msg!r}"


@pytest.mark.parametrize("name", ["kvarn-k4v2-g64", "kvarn-x", "kvarn-kav2-g128"])
def test_malformed_kvarn_preset_raises_listing_valid_names(name):
    with pytest.raises(ValueError) as ei:
        preset_scheme(name, 2, 2, 64)
    assert all(p in str(ei.value) for p in PRESETS), f"message does not list valid presets: {ei.value}"


def ref_scheme_attention(q, k16, v16, k_hat, v_hat, tile, keep_first, scaling):
    """float64: causal softmax where key j is read quantized iff its tile is completed before the
    query's own tile (and is not the kept first tile); every read quantized when tile == 1."""
    b, hq, t, d = q.shape
    h = k16.shape[1]
    pos = torch.arange(t)
    qt, kt = pos[:, None] // tile, pos[None, :] // tile
    sel = torch.ones(t, t, dtype=torch.bool) if tile == 1 else (kt < qt) & ~((kt == 0) & keep_first)
    g = hq // h
    qd = q.double()
    exp = lambda x: x.double().repeat_interleave(g, 1)  # noqa: E731  KV head of query head i: i // g
    s = torch.where(sel, qd @ exp(k_hat).transpose(-1, -2), qd @ exp(k16).transpose(-1, -2)) * scaling
    s = s.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    p = torch.softmax(s, -1)
    return (p * sel) @ exp(v_hat) + (p * ~sel) @ exp(v16)


@pytest.mark.parametrize("name", ["kivi-2", "kvarn-k2v2-g128", "kvarn-k4v2-g128-nosink", "int4-per-token-head", "fp8-e4m3", None])
def test_scheme_attention_reads_like_runtime(name):
    t, d, h, hq = 290, 64, 2, 6
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(1, hq, t, d, generator=gen)
    k = torch.randn(1, h, t, d, generator=gen) * 2
    v = torch.randn(1, h, t, d, generator=gen)
    bias = torch.where(torch.arange(t)[None, :] <= torch.arange(t)[:, None], 0.0, float("-inf"))
    scheme = None if name is None else preset_scheme(name, 1, h, d)
    got = SchemeAttention(scheme).attend(0, q, k, v, bias, 1 / math.sqrt(d))
    k16, v16 = k.half().float(), v.half().float()
    if scheme is None:
        k_hat, v_hat, tile, keep = k16, v16, 1, False
    else:
        fmt = scheme.layers[0]
        tile, keep = fmt.tile, scheme.keep_first_tile
        k_hat = fake_quantize_sequence(k16, fmt.k, tile, keep)
        v_hat = fake_quantize_sequence(v16, fmt.v, tile, keep)
    ref = ref_scheme_attention(q, k16, v16, k_hat, v_hat, tile, keep, 1 / math.sqrt(d))
    err = (got.double() - ref).abs().max().item()
    assert err <= 2e-5, f"SchemeAttention({name}) vs float64 reference: max abs err {err:.3e} > 2e-5"
