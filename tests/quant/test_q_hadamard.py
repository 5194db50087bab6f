"""kvarn.quant.hadamard against float64 references written here.

Reference for the matrix: the Sylvester-Hadamard entry formula H[i, j] = (-1)**popcount(i & j) / sqrt(D),
computed entry by entry (independent of the recursive construction under test).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvarn.errors import KvarnError
from kvarn.quant.hadamard import check_head_dim, hadamard_matrix, rotate



POW2 = [2**i for i in range(10)]  # 1 .. 512


@functools.lru_cache(maxsize=None)
def ref_hadamard(d: int) -> torch.Tensor:
    h = torch.empty(d, d, dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            h[i, j] = (-1.0) ** bin(i & j).count("1") / math.sqrt(d)
    return h


@pytest.mark.parametrize("d", POW2)
def test_hadamard_orthonormal_symmetric(d):
    h = hadamard_matrix(d, dtype=torch.float64)
    assert h.shape == (d, d) and h.dtype == torch.float64
    eye = torch.eye(d, dtype=torch.float64)
    err = (h @ h.T - eye).abs().max().item()
    assert err <= 1e-12, f"H @ H.T - I: max abs err {err:.3e} > 1e-12 at D={d}"
    assert torch.equal(h, h.T), f"H is not symmetric at D={d}"
    mag = (h.abs() - 1 / math.sqrt(d)).abs().max().item()
    assert mag <= 1e-15, f"|H| - 1/sqrt(D): max abs err {mag:.3e} > 1e-15 at D={d}"


@pytest.mark.parametrize("d", POW2)
def test_hadamard_matches_entry_formula(d):
    h = hadamard_matrix(d, dtype=torch.float64)
    ref = ref_hadamard(d)
    err = (h - ref).abs().max().item()
    assert err <= 1e-15, f"H vs (-1)^popcount(i&j)/sqrt(D): max abs err {err:.3e} > 1e-15 at D={d}"


# D = 12·2^k and 20·2^k: Paley II ⊗ Sylvester (head_dim 96 = 12·8, 80 = 20·4)
PALEY = [12, 20, 24, 40, 48, 80, 96, 160, 192]


@pytest.mark.parametrize("d", PALEY)
def test_paley_hadamard_orthonormal_symmetric_with_equal_magnitudes(d):
    """A Hadamard matrix: entries ±1/sqrt(D) and H Hᵀ = I (the defining property, checked in
    float64); symmetric, so ``rotate`` is its own exact inverse."""
    h = hadamard_matrix(d, dtype=torch.float64)
    assert h.shape == (d, d)
    eye = torch.eye(d, dtype=torch.float64)
    err = (h @ h.T - eye).abs().max().item()
    assert err <= 1e-12, f"H @ H.T - I: max abs err {err:.3e} > 1e-12 at D={d}"
    assert torch.equal(h, h.T), f"H is not symmetric at D={d}"
    signs = h * math.sqrt(d)
    assert torch.equal(signs.round(), signs) and set(signs.flatten().tolist()) == {-1.0, 1.0}, f"entries not ±1/sqrt(D) at D={d}"
    # every channel is spread over every other one (no block structure): all entries nonzero above
    assert (h != 0).all()


@pytest.mark.parametrize("d", [80, 96])
def test_rotate_80_96_exact_inverse_and_preserves_dots(d):
    gen = torch.Generator().manual_seed(d)
    q = torch.randn(3, 37, d, generator=gen, dtype=torch.float64) * 3
    k = torch.randn(3, 37, d, generator=gen, dtype=torch.float64) * 3
    k[..., 5] += 40.0  # an outlier channel: the rotation spreads it over all D channels
    rq, rk = rotate(q), rotate(k)
    inv = (rotate(rq) - q).abs().max().item()
    assert inv <= 1e-12, f"rotate(rotate(q)) - q at D={d}: {inv:.3e}"
    derr = ((rq * rk).sum(-1) - (q * k).sum(-1)).abs().max().item()
    assert derr <= 1e-9, f"rotated dot products differ by {derr:.3e} at D={d}"
    assert rk.abs().amax(-1).mean() < 0.4 * k.abs().amax(-1).mean(), "the outlier was not spread"
    # float32 close to float64 (what the runtime uses)
    err = (rotate(q.float()).double() - rq).abs().max().item()
    assert err <= 1e-4, f"float32 rotate vs float64 at D={d}: {err:.3e}"


@pytest.mark.parametrize("d", [0, 3, 6, 36, 72, 100, 112])
def test_hadamard_matrix_rejects_sizes_without_a_construction(d):
    with pytest.raises(KvarnError) as ei:
        hadamard_matrix(d)
    assert str(d) in str(ei.value)


@settings(max_examples=30, deadline=None)
@given(
    log_d=st.integers(0, 9),
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_rotate_matches_reference_and_preserves_geometry(log_d, lead, seed):
    d = 2**log_d
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, d, generator=gen, dtype=torch.float64) * 3
    k = torch.randn(*lead, d, generator=gen, dtype=torch.float64) * 3
    rq, rk = rotate(q), rotate(k)
    assert rq.shape == q.shape and rq.dtype == torch.float64
    # x @ H with the entry-formula matrix
    href = ref_hadamard(d)
    ref = q @ href
    err = (rq - ref).abs().max().item() if q.numel() else 0.0
    assert err <= 1e-12, f"rotate(q) vs float64 q @ H: max abs err {err:.3e} > 1e-12"
    dot_ref = (q * k).sum(-1)
    dot = (rq * rk).sum(-1)
    tol = 1e-10 * (1 + (dot_ref.abs().max().item() if dot_ref.numel() else 0))
    if dot.numel():
        derr = (dot - dot_ref).abs().max().item()
        assert derr <= tol, f"rotate(q).rotate(k) - q.k: max abs err {derr:.3e} > {tol:.3e}"
        nerr = (rq.norm(dim=-1) - q.norm(dim=-1)).abs().max().item()
        assert nerr <= 1e-10, f"|rotate(q)| - |q|: max abs err {nerr:.3e} > 1e-10"
        inv = (rotate(rq) - q).abs().max().item()
        assert inv <= 1e-12, f"rotate(rotate(q)) - q: max abs err {inv:.3e} > 1e-12"


def test_rotate_float32_close_to_float64():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 128, generator=gen, dtype=torch.float64)
    got = rotate(x.float())
    assert got.dtype == torch.float32
    ref = x @ ref_hadamard(128)
    err = (got.double() - ref).abs().max().item()
    assert err <= 1e-5, f"float32 rotate vs float64 reference: max abs err {err:.3e} > 1e-5"


@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
def test_check_head_dim_accepts(d):
    check_head_dim(d)


@pytest.mark.parametrize("d", [72, 100, 160])
def test_check_head_dim_rejects_with_one_line_message(d):
    with pytest.raises(KvarnError) as ei:
        check_head_dim(d)
    msg = str(ei.value)
    assert "\n" not in msg.strip() and msg.strip(), f"message is not one non-empty line: {msg!r}"
    assert str(d) in msg, f"message does not name the value {d}: {msg!r}"
