"""kvarn.quant.codec: encode/decode == fake quantization, a float64 reference of the tile pipeline,
and fake_quantize_sequence against a per-head, per-tile loop.

Reference pipeline (module docstrings of codec/formats/rtn), float64: rotate by the entry-formula
Hadamard H[i,j] = (-1)^popcount(i&j)/sqrt(D); divide by the normalization multiplier; per group
asymmetric RTN with fp16 scale/zero (struct-rounded); multiply back; rotate back.
"""

from __future__ import annotations

import itertools
import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvarn.quant.codec import (
    EncodedTiles,
    decode_tiles,
    encode_tiles,
    fake_quantize_sequence,
    fake_quantize_tiles,
    quantized_span,
)
from kvarn.quant.formats import TensorFormat
from kvarn.quant.hadamard import rotate
from kvarn.quant.normalize import variance_normalize



D_CHOICES = [64, 128]


def fp16(v: float) -> float:
    return struct.unpack("<e", struct.pack("<e", v))[0]


def ref_hadamard(d: int) -> torch.Tensor:
    i = torch.arange(d)
    bits = torch.zeros(d, d, dtype=torch.int64)
    a = i[:, None] & i[None, :]
    while bool(a.any()):
        bits += a & 1
        a = a >> 1
    return (1.0 - 2.0 * (bits % 2)).double() / math.sqrt(d)


def fp16_sensitive(v: float, a: float) -> bool:
    """True if moving ``v`` by +-a can change its fp16 rounding."""
    return fp16(v + a) != fp16(v - a)


def ref_rtn_groups(y: torch.Tensor, bits: int, dim: int, eps: float):
    """float64 per-group loop of asymmetric RTN (rtn docstring). Returns (y_hat, step, fuzzy):
    step = the group's scale per element; fuzzy marks elements whose result may legitimately differ
    when y is only known to +-eps (float32 evaluation): the whole group if its scale or zero sits
    at an fp16 rounding midpoint, else the element if it sits at a code rounding boundary."""
    levels = 2**bits - 1
    yt = y.movedim(dim, -1)
    flat = yt.reshape(-1, yt.shape[-1])
    out = torch.empty_like(flat)
    step = torch.empty_like(flat)
    fuzzy = torch.zeros(flat.shape, dtype=torch.bool)
    for gi in range(flat.shape[0]):
        vals = flat[gi].tolist()
        lo, hi = min(vals), max(vals)
        pre = max((hi - lo) / levels, 6.2e-5)
        s = fp16(pre)
        z = fp16(lo)
        big = max(abs(lo), abs(hi))
        group_fuzzy = (fp16_sensitive(pre, (2 * eps + 2.4e-7 * big) / levels + 2.4e-7 * pre)
                       or fp16_sensitive(lo, eps + 1.2e-7 * abs(lo)))
        for j, v in enumerate(vals):
            t = (v - z) / s
            out[gi, j] = min(max(math.floor(t + 0.5), 0), levels) * s + z
            step[gi, j] = s
            window = (eps + 2.4e-7 * (abs(v) + abs(z))) / s + 2.4e-7 * (levels + 1)
            fuzzy[gi, j] = group_fuzzy or abs(t - math.floor(t) - 0.5) <= window
    shape = lambda u: u.reshape(yt.shape).movedim(-1, dim)  # noqa: E731
    return shape(out), shape(step), shape(fuzzy)


def ref_fake_tiles_quant_basis(x, fmt: TensorFormat, bits: int, mult: torch.Tensor | None, eps: float):
    """float64 reference of fake_quantize_tiles (codec rtn) *before* the final rotation back:
    returns (y_hat * mult, step * mult, fuzzy) in the rotated basis (mult: normalization multiplier)."""
    x = x.double()
    y = x @ ref_hadamard(x.shape[-1]) if fmt.hadamard else x
    m = torch.ones(1, dtype=torch.float64) if mult is None else mult.double()
    y = y / m
    y_hat, step, fuzzy = ref_rtn_groups(y, bits, -2 if fmt.axis == "channel" else -1, eps)
    return y_hat * m, step * m, fuzzy


# --------------------------------------------------------------------------------------------
# encode -> decode is exactly the fake quantization
# --------------------------------------------------------------------------------------------

RTN_VARIANTS = [
    dict(axis=a, normalize=n, hadamard=h, clip=c)
    for a, n, h, c in itertools.product(("channel", "token"), ("none", "tile", "static"), (True, False), (False, True))
    if not (n == "static" and a == "channel")
]


@settings(max_examples=40, deadline=None)
@given(variant=st.sampled_from(RTN_VARIANTS + [dict(codec="fp8"), dict(axis="token", codec="fp8")]),
       bits=st.sampled_from([1, 2, 3, 4, 8, 16]), d=st.sampled_from(D_CHOICES),
       b=st.integers(1, 2), h=st.integers(1, 3), g=st.sampled_from([8, 64]),
       use_prior=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_decode_encode_equals_fake_quantize(variant, bits, d, b, h, g, use_prior, seed):
    fmt = TensorFormat((bits,), **variant)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, g, d, generator=gen) * torch.exp(torch.randn(1, h, 1, d, generator=gen))
    prior = None
    if use_prior or fmt.normalize == "static":
        prior = 0.5 * torch.randn(1, h, d, generator=gen)
    enc = encode_tiles(x, fmt, bits, prior, iters=3)
    assert isinstance(enc, EncodedTiles)
    dec = decode_tiles(enc, fmt, d, prior)
    fake = fake_quantize_tiles(x, fmt, bits, prior, iters=3)
    assert dec.dtype == torch.float32 and fake.dtype == torch.float32 and dec.shape == x.shape == fake.shape
    diff = (dec - fake).abs().max().item()
    assert torch.equal(dec, fake), f"{variant} bits={bits}: decode(encode(x)) != fake_quantize_tiles(x), max abs diff {diff:.3e}"
    if bits not in (16,) and fmt.codec == "rtn":
        assert enc.codes.dtype == torch.uint8 and enc.codes.shape == (b, h, g, d * bits // 8), \
            f"codes {enc.codes.dtype} {tuple(enc.codes.shape)}"
        assert enc.scale.dtype == torch.float16 and enc.zero.dtype == torch.float16
        red = (b, h, 1, d) if fmt.axis == "channel" else (b, h, g, 1)
        assert enc.scale.shape == red and enc.zero.shape == red, f"scale {tuple(enc.scale.shape)} != {red}"
        if fmt.normalize == "tile":
            nshape = (b, h, g, 1) if fmt.axis == "channel" else (b, h, 1, d)
            assert enc.norm.dtype == torch.float16 and enc.norm.shape == nshape, f"norm {tuple(enc.norm.shape)} != {nshape}"
        else:
            assert enc.norm is None


@pytest.mark.parametrize("variant", RTN_VARIANTS + [dict(codec="fp8"), dict(axis="token", codec="fp8")],
                         ids=lambda v: "-".join(f"{k}={v[k]}" for k in sorted(v)))
def test_decode_encode_equals_fake_quantize_every_format(variant):
    """Every format x every bit width (incl. 16), with and without a [1, h, D] prior."""
    gen = torch.Generator().manual_seed(len(str(variant)))
    x = torch.randn(2, 3, 16, 64, generator=gen) * torch.exp(torch.randn(1, 3, 1, 64, generator=gen))
    for bits in (1, 2, 3, 4, 8, 16):
        fmt = TensorFormat((bits,), **variant)
        for prior in (None, 0.5 * torch.randn(1, 3, 64, generator=gen)):
            if prior is None and fmt.normalize == "static" and bits != 16:
                continue
            dec = decode_tiles(encode_tiles(x, fmt, bits, prior, iters=2), fmt, 64, prior)
            fake = fake_quantize_tiles(x, fmt, bits, prior, iters=2)
            diff = (dec - fake).abs().max().item()
            assert torch.equal(dec, fake), (
                f"{variant} bits={bits} prior={'yes' if prior is not None else 'no'}: decode(encode(x)) != "
                f"fake_quantize_tiles(x), max abs diff {diff:.3e}")


def test_special_codecs_match_casts():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 16, 64, generator=gen) * 5
    got16 = fake_quantize_tiles(x, TensorFormat((16,)), 16)
    assert torch.equal(got16, x.half().float()), "bits=16 fake quantization != fp16 rounding"
    got8 = fake_quantize_tiles(x, TensorFormat((8,), codec="fp8"), 8)
    assert torch.equal(got8, x.to(torch.float8_e4m3fn).float()), "fp8 fake quantization != e4m3 cast"
    # fp8 e4m3 relative error <= 2^-4 for normal values in range
    big = x.abs() > 2**-6
    rel = ((got8 - x).abs() / x.abs())[big].max().item()
    assert rel <= 2**-4 + 1e-7, f"fp8 relative error {rel:.4f} > 2^-4"


def test_static_without_prior_raises():
    fmt = TensorFormat((4,), "token", "static")
    with pytest.raises(ValueError):
        encode_tiles(torch.randn(8, 64), fmt, 4)
    with pytest.raises(ValueError):
        fake_quantize_tiles(torch.randn(8, 64), fmt, 4)


def test_rtn_sym_has_no_stored_form():
    with pytest.raises(ValueError):
        encode_tiles(torch.randn(8, 64), TensorFormat((4,), "token", codec="rtn-sym"), 4)


# --------------------------------------------------------------------------------------------
# fake_quantize_tiles vs the float64 pipeline reference
# --------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(variant=st.sampled_from([v for v in RTN_VARIANTS if not v["clip"]]),
       bits=st.sampled_from([2, 3, 4, 8]), d=st.sampled_from(D_CHOICES), g=st.sampled_from([8, 64]),
       seed=st.integers(0, 2**31 - 1))
def test_fake_quantize_tiles_matches_float64_pipeline(variant, bits, d, g, seed):
    fmt = TensorFormat((bits,), **variant)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, g, d, generator=gen) * torch.exp(torch.randn(1, 1, d, generator=gen))
    prior = 0.3 * torch.randn(2, d, generator=gen)
    got = fake_quantize_tiles(x, fmt, bits, prior, iters=4).double()
    mult = None
    if fmt.normalize == "static":
        mult = torch.exp(prior.double())[:, None, :]
    elif fmt.normalize == "tile":
        # the normalizer is checked in test_q_normalize and rotate in test_q_hadamard: take the scales
        # they give on the float32 rotated tile, fp16-rounded and clamped as the docstrings say
        xr = rotate(x) if fmt.hadamard else x
        log_r, log_c = variance_normalize(xr, 4, prior[:, None, :])
        stored = log_r if fmt.axis == "channel" else log_c
        # exp in float32 (as stored), then clamp and fp16 rounding done here
        e32 = torch.exp(stored.float()).double().flatten().tolist()
        mult = torch.tensor([fp16(min(max(v, 6.2e-5), 65504.0)) for v in e32], dtype=torch.float64).reshape(stored.shape)
    # How far float32 evaluation of the quantizer's input (rotation, division by the multiplier)
    # can be from float64: measured here, with margin (only decides which elements are "fuzzy").
    m64 = torch.ones(1, dtype=torch.float64) if mult is None else mult.double()
    y64 = (x.double() @ ref_hadamard(d) if fmt.hadamard else x.double()) / m64
    y32 = (rotate(x) if fmt.hadamard else x) / m64.float()
    eps = 4 * float((y32.double() - y64).abs().max()) + 1e-7 * float(y64.abs().max())
    ref, step, fuzzy = ref_fake_tiles_quant_basis(x, fmt, bits, mult, eps)
    # Compare in the quantization basis; H is orthonormal and self-inverse, so got @ H is the
    # dequantized tile before the final rotation. Elements whose float64 reference sits at an fp16
    # or code rounding boundary (fuzzy) may differ by a flipped code / fp16 ulp: <= 1.5 steps.
    if fmt.hadamard:
        got = got @ ref_hadamard(d)
    err = (got - ref).abs()
    tol = 1e-5 * (1 + float(ref.abs().max()))
    strict = ~fuzzy
    worst = err[strict].max().item() if strict.any() else 0.0
    assert worst <= tol, (
        f"{variant} bits={bits}: max abs err {worst:.3e} > {tol:.3e} vs the float64 pipeline on "
        f"{int(strict.sum())} non-boundary elements ({int((err[strict] > tol).sum())} off)")
    steps = (err / step).max().item()
    assert steps <= 1.5, f"{variant} bits={bits}: an element is off by {steps:.3f} quantization steps (> 1.5)"
    assert fuzzy.double().mean() <= 0.25, f"test setup: {fuzzy.double().mean():.1%} of elements at boundaries"


# --------------------------------------------------------------------------------------------
# fake_quantize_sequence
# --------------------------------------------------------------------------------------------

def ref_sequence(x, fmt, tile, keep_first, log_std, iters):
    """Per batch, head and completed tile: fake_quantize_tiles on that single tile."""
    b, h, t, d = x.shape
    out = x.double().half().double().clone()  # fp16-rounded default
    if tile == 1:
        start, n = 0, t
    else:
        start = tile if keep_first else 0
        n = max(0, (t - start) // tile)
    g = 1 if tile == 1 else tile
    for bi in range(b):
        for hi in range(h):
            prior = None if log_std is None else log_std[hi]
            for k in range(n):
                sl = slice(start + k * g, start + (k + 1) * g)
                out[bi, hi, sl] = fake_quantize_tiles(x[bi, hi, sl], fmt, fmt.bits[hi], prior, iters).double()
    return out, start, start + n * g


def check_sequence(x, fmt, tile, keep_first, log_std, exact: bool):
    got = fake_quantize_sequence(x, fmt, tile, keep_first, log_std, iters=2)
    ref, start, end = ref_sequence(x, fmt, tile, keep_first, log_std, 2)
    t = x.shape[2]
    assert (start, end) == quantized_span(t, tile, keep_first), f"quantized_span {quantized_span(t, tile, keep_first)} != {(start, end)}"
    assert got.dtype == torch.float32 and got.shape == x.shape
    fp16x = x.half().float()
    assert torch.equal(got[:, :, :start], fp16x[:, :, :start]), "first tile is not fp16-rounded input"
    assert torch.equal(got[:, :, end:], fp16x[:, :, end:]), "incomplete tail is not fp16-rounded input"
    err = (got.double() - ref).abs()
    if exact:
        assert torch.equal(got.double(), ref), (
            f"fake_quantize_sequence != per-head/per-tile loop of fake_quantize_tiles: "
            f"{int((err > 0).sum())} elements differ, max {err.max().item():.3e}")
    else:  # batched vs single-tile float32 rotations may flip a rare code or fp16 parameter
        frac = (err > 1e-5 * (1 + ref.abs())).double().mean().item()
        assert frac <= 0.02, f"fake_quantize_sequence vs per-tile loop: {frac:.2%} elements differ (> 2%), max {err.max().item():.3e}"
    for hi, bw in enumerate(fmt.bits):
        if end > start and bw != 16:
            changed = (got[:, hi, start:end] != fp16x[:, hi, start:end]).double().mean().item()
            assert changed > 0.5, f"head {hi} ({bw} bits): only {changed:.1%} of completed-tile values changed"


@settings(max_examples=30, deadline=None)
@given(t=st.integers(1, 300), tile=st.sampled_from([1, 16, 64]), keep_first=st.booleans(),
       axis=st.sampled_from(["channel", "token"]), normalize=st.sampled_from(["none", "tile", "static"]),
       bits=st.lists(st.sampled_from([2, 3, 4, 8, 16]), min_size=1, max_size=3),
       seed=st.integers(0, 2**31 - 1))
def test_fake_quantize_sequence_matches_tile_loop(t, tile, keep_first, axis, normalize, bits, seed):
    """Without rotation every op is elementwise or a per-axis reduction: batched == one tile at a time, bit for bit."""
    if normalize == "static" and axis == "channel":
        axis = "token"
    if tile == 1:
        axis = "token"
    fmt = TensorFormat(tuple(bits), axis, normalize, hadamard=False)
    h, d = len(bits), 64
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, h, t, d, generator=gen) * torch.exp(torch.randn(1, h, 1, d, generator=gen))
    log_std = 0.3 * torch.randn(h, d, generator=gen)
    check_sequence(x, fmt, tile, keep_first, log_std, exact=True)


@pytest.mark.parametrize("t,tile,keep_first,axis,normalize,bits", [
    (300, 64, True, "channel", "tile", (2, 4, 2)),
    (277, 64, False, "token", "tile", (3, 8)),
    (200, 16, True, "token", "static", (4, 2, 16)),
    (150, 1, False, "token", "none", (2, 4)),
    (129, 64, False, "channel", "none", (4,)),
])
def test_fake_quantize_sequence_with_rotation_matches_tile_loop(t, tile, keep_first, axis, normalize, bits):
    fmt = TensorFormat(bits, axis, normalize)
    h, d = len(bits), 64
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(2, h, t, d, generator=gen) * torch.exp(torch.randn(1, h, 1, d, generator=gen))
    log_std = 0.3 * torch.randn(h, d, generator=gen)
    check_sequence(x, fmt, tile, keep_first, log_std, exact=False)


def test_sequence_first_tile_and_tail_exact():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 2, 64 * 3 + 17, 64, generator=gen) * 3
    fmt = TensorFormat((2, 4), "channel", "tile")
    got = fake_quantize_sequence(x, fmt, 64, True)
    fp16x = x.half().float()
    assert torch.equal(got[:, :, :64], fp16x[:, :, :64]), "kept first tile changed"
    assert torch.equal(got[:, :, 192:], fp16x[:, :, 192:]), "open tail changed"
    assert (got[:, :, 64:192] != fp16x[:, :, 64:192]).double().mean() > 0.9, "completed tiles not quantized"
    got = fake_quantize_sequence(x, fmt, 64, False)
    assert (got[:, :, :64] != fp16x[:, :, :64]).double().mean() > 0.9, "first tile not quantized with keep_first_tile=False"
    assert torch.equal(got[:, :, 192:], fp16x[:, :, 192:]), "open tail changed (keep_first_tile=False)"
    short = x[:, :, :100]
    assert torch.equal(fake_quantize_sequence(short, fmt, 64, True), short.half().float()), \
        "sequence shorter than two tiles changed with keep_first_tile=True"


def test_sequence_per_token_channel_axis_raises():
    with pytest.raises(ValueError):
        fake_quantize_sequence(torch.randn(1, 1, 8, 64), TensorFormat((4,), "channel"), 1, False)


# --------------------------------------------------------------------------------------------
# error behaviour
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", [
    dict(axis="channel", normalize="tile"), dict(axis="token", normalize="tile"),
    dict(axis="channel", normalize="none"), dict(axis="token", normalize="none", hadamard=False),
    dict(axis="channel", normalize="tile", clip=True),
])
def test_mse_decreases_with_bits(variant):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 128, 64, generator=gen)
    mse = {}
    for bits in (1, 2, 3, 4, 8):
        fmt = TensorFormat((bits,), **variant)
        mse[bits] = (fake_quantize_tiles(x, fmt, bits) - x).pow(2).mean().item()
    assert mse[1] > mse[2] > mse[3] > mse[4] > mse[8], f"{variant}: MSE by bits {mse} not decreasing"
    assert mse[4] < 0.3 * mse[2] and mse[8] < 1e-3, f"{variant}: MSE by bits {mse}"


def test_per_head_bits_honored():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 64 * 4 + 5, 64, generator=gen)
    fmt = TensorFormat((8, 2, 4), "token", "tile")
    got = fake_quantize_sequence(x, fmt, 64, True)
    err = [(got[:, h, 64:256] - x[:, h, 64:256]).pow(2).mean().item() for h in range(3)]
    assert err[0] < 0.01 * err[2] < 0.01 * err[1], f"per-head MSE {err} for bits (8, 2, 4)"
    # each head equals quantizing it alone with its own bits
    for h, bw in enumerate(fmt.bits):
        alone = fake_quantize_sequence(x[:, h:h + 1], TensorFormat((bw,), "token", "tile"), 64, True)
        assert torch.equal(got[:, h:h + 1], alone), f"head {h}: grouped result != head quantized alone with {bw} bits"
