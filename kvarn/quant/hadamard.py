"""Orthonormal Hadamard rotation along head_dim.

Shape letters used across kvarn: B batch, H KV heads, T tokens, G tokens per tile, D head_dim,
L layers.

The matrix is ``H_m ⊗ S_{2^k} / sqrt(D)`` for ``D = m · 2^k``: ``S`` is the Sylvester matrix and
``H_m`` (m = 1, 12 or 20) a *symmetric* Hadamard matrix from Paley's second construction
(q = 5 → 12, q = 9 → 20; q a prime power ≡ 1 mod 4). So head_dim 80 (= 20·4, Phi-2, StableLM-3B)
and 96 (= 12·8, Phi-3) get a full rotation that mixes every channel with every other, like the
power-of-two sizes, with no padding: the stored bytes are the plain ``D``-channel formula of
``kvarn.quant.formats``. Every matrix here is symmetric and orthonormal, so ``rotate`` is its own
inverse and every reader (reference, kernels) uses one matrix both ways.

Why not a block-diagonal rotation (64+16 / 64+32, the simpler alternative)? It mixes the last
16/32 channels only among themselves. ``bench/rotation_quality.py`` (results in
``bench/results/rotation_quality.md``) stores SmolLM2's real keys and values, extended to 80/96
channels with whole RoPE pairs of a neighbouring head, with kvarn's formats: with quantized keys the
attention-output error of the full H80 is 23% / 18% lower than 64+16's at 3 / 4 bits (9% at 2),
H96's 15% / 14% lower than 64+32's, and both match a random orthogonal rotation; values differ by
2-4%. (On SmolLM2's real 64-channel heads a 32+32 split had 11-12% less key error than the full
H64 at 2-3 bits and 12% more at 4: how much a block structure costs depends on the data. One
window of 1024 tokens; kvarn keeps the full rotation at every size.)
"""

from __future__ import annotations

import functools

import torch

from ..errors import KvarnError

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
# m -> the q of Paley's second construction giving a symmetric Hadamard matrix of order m = 2(q+1)
_PALEY_Q = {12: 5, 20: 9}


def check_head_dim(head_dim: int, what: str = "head_dim") -> None:
    """Raise a one-line KvarnError unless ``head_dim`` is one kvarn supports.

    Supported sizes have a symmetric Hadamard matrix (``hadamard_matrix``) and are tested end to
    end; other sizes are refused rather than padded, so no hidden bytes enter the capacity math.
    """
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise KvarnError(
            f"{what}={head_dim} is not supported: kvarn's Hadamard rotation is built and tested for "
            f"head_dim in {list(SUPPORTED_HEAD_DIMS)}; use a model with one of those head sizes"
        )


def _gf(q: int) -> tuple[list, callable]:
    """Elements of GF(q) (q prime, or 9 = GF(3)[i]/(i²+1)) and their subtraction."""
    if q == 9:
        elems = [(a, b) for a in range(3) for b in range(3)]
        return elems, lambda x, y: ((x[0] - y[0]) % 3, (x[1] - y[1]) % 3)
    if q < 2 or any(q % p == 0 for p in range(2, q)):
        raise ValueError(f"GF({q}) is not implemented here")
    return list(range(q)), lambda x, y: (x - y) % q


def _gf_squares(q: int) -> set:
    elems, _ = _gf(q)
    if q == 9:
        mul = lambda x, y: ((x[0] * y[0] - x[1] * y[1]) % 3, (x[0] * y[1] + x[1] * y[0]) % 3)  # noqa: E731
    else:
        mul = lambda x, y: (x * y) % q  # noqa: E731
    zero = elems[0]
    return {mul(z, z) for z in elems if z != zero}


@functools.lru_cache(maxsize=8)
def _paley2(q: int) -> torch.Tensor:
    """Symmetric ±1 Hadamard matrix of order 2(q+1) (Paley II; q ≡ 1 mod 4, so χ(-1) = 1).

    Jacobsthal ``Q[a, b] = χ(a - b)`` (χ: quadratic character of GF(q)) is symmetric; the
    conference matrix ``C = [[0, 1ᵀ], [1, Q]]`` has ``C Cᵀ = q I``; then
    ``C ⊗ [[1, -1], [-1, -1]] + I ⊗ [[1, 1], [1, -1]]`` is Hadamard and symmetric.
    """
    elems, sub = _gf(q)
    squares = _gf_squares(q)
    zero = elems[0]
    chi = lambda z: 0 if z == zero else (1 if z in squares else -1)  # noqa: E731
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    for i, a in enumerate(elems):
        for j, b in enumerate(elems):
            c[1 + i, 1 + j] = chi(sub(a, b))
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _split(d: int) -> tuple[int, int] | None:
    """``(m, 2^k)`` with ``d = m · 2^k`` and m a base order we have (1, 12, 20), or None."""
    for m in (1, *_PALEY_Q):
        p = d // m
        if d % m == 0 and p >= 1 and p & (p - 1) == 0:
            return m, p
    return None


def has_hadamard(d: int) -> bool:
    """Whether ``hadamard_matrix(d)`` exists: d = 2^k, 12·2^k or 20·2^k."""
    return d >= 1 and _split(d) is not None


@functools.lru_cache(maxsize=16)
def _hadamard_cpu(d: int) -> torch.Tensor:
    m, p = _split(d)
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    if m > 1:
        h = torch.kron(_paley2(_PALEY_Q[m]), h)
    return h / d**0.5


def hadamard_matrix(d: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The symmetric orthonormal Hadamard matrix ``[D, D]`` (H @ H.T = I, H = H.T).

    ``D = 2^k`` (Sylvester), ``12 · 2^k`` or ``20 · 2^k`` (Paley II ⊗ Sylvester); the
    user-facing check is ``check_head_dim``.
    """
    if not has_hadamard(d):
        raise KvarnError(f"head_dim={d} has no Hadamard rotation here; it needs D = 2^k, 12·2^k or 20·2^k")
    return _hadamard_on(d, dtype, torch.device(device))


@functools.lru_cache(maxsize=64)
def _hadamard_on(d: int, dtype, device: torch.device) -> torch.Tensor:
    # Cached per (size, dtype, device): rotate() runs per layer per step, and a fresh host→device
    # copy each time would sit on the decode path.
    return _hadamard_cpu(d).to(device=device, dtype=dtype)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim: ``x @ H``. Since H is symmetric and orthonormal, ``rotate`` is its own
    inverse, and ``rotate(q) · rotate(k) == q · k``."""
    h = hadamard_matrix(x.shape[-1], dtype=x.dtype, device=x.device)
    return x @ h
