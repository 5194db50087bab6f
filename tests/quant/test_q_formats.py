"""kvarn.quant.formats: capacity anchors computed by hand, and capacity math == bytes really stored.

Hand anchors (per KV head, tile G, head_dim D, fp16 = 2 bytes):
  K channel-axis, tile-normalized, b bits: G*D*b/8 codes + D*2*2 (scale, zero per channel) + G*2 (row scale)
  V token-axis, tile-normalized, b bits:   G*D*b/8 codes + G*2*2 (scale, zero per token) + D*2 (col scale)
  bits/element = 8 * (K + V) / (G * 2 * D).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvarn.errors import KvarnError
from kvarn.quant.codec import encode_tiles
from kvarn.quant.formats import (
    ALL_BITS,
    LayerFormat,
    TensorFormat,
    bits_per_element,
    bytes_per_token,
    fp16_bytes_per_token,
    fp16_tokens_per_sequence,
    head_tile_bytes,
    tile_bytes,
)



def kvarn_layer(kb, vb, d, tile=128, heads=1):
    return LayerFormat(d, tile, TensorFormat((kb,) * heads, "channel", "tile"), TensorFormat((vb,) * heads, "token", "tile"))


def hand_bits(kb, vb, g, d, k_norm=True, v_norm=True):
    k = g * d * kb / 8 + d * 2 * 2 + (g * 2 if k_norm else 0)
    v = g * d * vb / 8 + g * 2 * 2 + (d * 2 if v_norm else 0)
    return 8 * (k + v) / (g * 2 * d)


@pytest.mark.parametrize("kb,vb,d,expected", [
    (4, 2, 64, 3.5625), (4, 2, 128, 3.375), (4, 4, 64, 4.5625), (2, 2, 64, 2.5625),
    # head_dim 80 (Phi-2, StableLM-3B) and 96 (Phi-3): no padding, the D-channel formula
    (4, 2, 80, 3.4875), (4, 2, 96, 3.4375), (3, 3, 80, 3.4875),
])
def test_kvarn_bits_per_element_anchors(kb, vb, d, expected):
    assert hand_bits(kb, vb, 128, d) == expected  # the hand formula agrees with the anchor
    for heads in (1, 3):
        got = bits_per_element([kvarn_layer(kb, vb, d, heads=heads)] * 2)
        assert got == expected, f"K{kb}V{vb} hd{d} x{heads} heads: bits/element {got} != {expected}"
    bpt = bytes_per_token(kvarn_layer(kb, vb, d, heads=2))
    assert bpt == expected * 2 * 2 * d / 8, f"bytes_per_token {bpt} != {expected * 2 * 2 * d / 8}"


@pytest.mark.parametrize("d,k_tile,v_tile", [
    # kvarn calibrate's formats (K: per-channel RTN, no normalization; V: static scale, per-token
    # RTN) at tile 128, K4 / V2, by hand: K 128*D*4/8 + 4*D, V 128*D*2/8 + 4*128
    (80, 5120 + 320, 2560 + 512), (96, 6144 + 384, 3072 + 512),
])
def test_recipe_formats_bytes_at_head_dim_80_96(d, k_tile, v_tile):
    from kvarn.ops.layout import PageLayout

    layer = LayerFormat(d, 128, TensorFormat((4, 4), "channel", "none", clip=True),
                        TensorFormat((2, 2), "token", "static", clip=True))
    assert tile_bytes(layer) == 2 * (k_tile + v_tile)
    assert bytes_per_token(layer) == 2 * (k_tile + v_tile) / 128
    assert bits_per_element([layer]) == 8 * (k_tile + v_tile) / 128 / (2 * d)
    # the page layout agrees byte for byte, with every field 16-byte aligned (asserted inside), at every width
    for kb, vb in itertools.product(ALL_BITS, ALL_BITS):
        lay = LayerFormat(d, 64, TensorFormat((kb, 4), "channel", "tile"), TensorFormat((vb, 2), "token", "tile"))
        assert PageLayout(lay, torch.zeros(2, d), torch.zeros(2, d)).nbytes == tile_bytes(lay), (kb, vb)


def test_kivi2_anchor():
    layer = LayerFormat(64, 128, TensorFormat((2,), "channel", "none", hadamard=False),
                        TensorFormat((2,), "token", "none", hadamard=False))
    got = bits_per_element([layer])
    assert got == 2.375 == hand_bits(2, 2, 128, 64, False, False), f"KIVI-2 hd64 bits/element {got} != 2.375"


def test_bits_per_element_mixed_layers_and_heads():
    a = LayerFormat(64, 128, TensorFormat((4, 2, 8), "channel", "tile"), TensorFormat((2, 2, 16), "token", "tile"))
    b = LayerFormat(128, 64, TensorFormat((3,), "channel", "none"), TensorFormat((1,), "token", "static"))
    # per head bytes per tile, by hand
    def k_bytes(bits, g, d, norm):
        return g * d * 2 if bits == 16 else g * d * bits // 8 + 4 * d + (2 * g if norm else 0)
    def v_bytes(bits, g, d, norm):
        return g * d * 2 if bits == 16 else g * d * bits // 8 + 4 * g + (2 * d if norm else 0)
    a_tile = sum(k_bytes(x, 128, 64, True) for x in (4, 2, 8)) + sum(v_bytes(x, 128, 64, True) for x in (2, 2, 16))
    b_tile = k_bytes(3, 64, 128, False) + v_bytes(1, 64, 128, False)
    assert tile_bytes(a) == a_tile and tile_bytes(b) == b_tile, f"tile_bytes {tile_bytes(a)}, {tile_bytes(b)} != {a_tile}, {b_tile}"
    expected = 8 * (a_tile / 128 + b_tile / 64) / (2 * 3 * 64 + 2 * 1 * 128)
    got = bits_per_element([a, b])
    assert abs(got - expected) <= 1e-12, f"bits_per_element {got} != {expected}"


@pytest.mark.parametrize("axis,tile,d,bits,expected", [
    ("token", 1, 64, 4, 64 * 4 // 8 + 2),          # int4 per token: codes + one fp16 scale
    ("token", 1, 128, 8, 128 + 2),
    ("channel", 128, 64, 4, 128 * 64 * 4 // 8 + 64 * 2),  # one fp16 scale per channel
    ("token", 64, 128, 2, 64 * 128 * 2 // 8 + 64 * 2),
])
def test_rtn_sym_and_fp8_head_tile_bytes(axis, tile, d, bits, expected):
    fmt = TensorFormat((bits,), axis, "none", hadamard=False, codec="rtn-sym")
    got = head_tile_bytes(fmt, bits, tile, d)
    assert got == expected, f"rtn-sym {axis} tile={tile} D={d} {bits}-bit: {got} bytes != {expected}"
    fp8 = TensorFormat((8,), axis, "none", hadamard=False, codec="fp8")
    assert head_tile_bytes(fp8, 8, tile, d) == tile * d, "fp8: one byte per element"
    assert head_tile_bytes(fmt, 16, tile, d) == tile * d * 2, "16 bits: fp16 storage"


def test_codes_must_fill_whole_bytes():
    with pytest.raises(KvarnError):
        head_tile_bytes(TensorFormat((3,), "token"), 3, 1, 4)  # 12 bits per token


def test_fp16_helpers():
    assert fp16_bytes_per_token(8, 128) == 2 * 8 * 128 * 2
    assert fp16_tokens_per_sequence(128, True) == 255
    assert fp16_tokens_per_sequence(128, False) == 127
    assert fp16_tokens_per_sequence(64, True) == 127
    assert fp16_tokens_per_sequence(1, True) == 0 and fp16_tokens_per_sequence(1, False) == 0


VARIANTS = [
    dict(axis=a, normalize=n, hadamard=h, clip=c, codec="rtn")
    for a, n, h, c in itertools.product(("channel", "token"), ("none", "tile", "static"), (True, False), (False, True))
    if not (n == "static" and a == "channel")
] + [dict(axis=a, normalize="none", hadamard=False, codec="fp8") for a in ("channel", "token")]


@settings(max_examples=40, deadline=None)
@given(variant=st.sampled_from(VARIANTS), tile=st.sampled_from([64, 128]), d=st.sampled_from([64, 80, 96, 128]),
       bits=st.lists(st.sampled_from(ALL_BITS), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_head_tile_bytes_equals_stored_bytes(variant, tile, d, bits, seed):
    fmt = TensorFormat(tuple(bits), **variant)
    gen = torch.Generator().manual_seed(seed)
    prior = torch.randn(len(bits), d, generator=gen) * 0.3
    for h, b in enumerate(bits):
        x = torch.randn(tile, d, generator=gen) * torch.exp(torch.randn(d, generator=gen))
        enc = encode_tiles(x, fmt, b, prior[h], iters=2)
        want = head_tile_bytes(fmt, b, tile, d)
        assert enc.nbytes() == want, (
            f"{variant} tile={tile} D={d} head {h} bits={b}: stored {enc.nbytes()} bytes != head_tile_bytes {want}")
    # whole-layer: tile_bytes == everything encode_tiles stores for one tile of every head, K and V
    layer = LayerFormat(d, tile, fmt, fmt)
    stored = 0
    for b in fmt.bits:
        for _ in range(2):
            stored += encode_tiles(torch.randn(tile, d, generator=gen), fmt, b, prior[0], iters=1).nbytes()
    assert tile_bytes(layer) == stored, f"tile_bytes {tile_bytes(layer)} != stored {stored}"
    assert bytes_per_token(layer) == stored / tile


def test_format_validation():
    with pytest.raises(KvarnError):
        TensorFormat((4,), "channel", "static")
    with pytest.raises(KvarnError):
        TensorFormat((5,))
    with pytest.raises(KvarnError):
        TensorFormat((4,), axis="row")
    with pytest.raises(KvarnError):
        LayerFormat(64, 128, TensorFormat((4, 4)), TensorFormat((4,), "token"))
