"""Orthonormal Hadamard rotation along head_dim.

Shape letters used across kvarn: B batch, H KV heads, T tokens, G tokens per tile, D head_dim,
L layers.
"""

from __future__ import annotations

import functools

import torch

from ..errors import KvarnError

SUPPORTED_HEAD_DIMS = (64, 128, 256)


def check_head_dim(head_dim: int, what: str = "head_dim") -> None:
    """Raise a one-line KvarnError unless ``head_dim`` is one kvarn supports.

    Only powers of two have a Sylvester Hadamard matrix; padding other sizes would cost bytes the
    capacity math would have to hide, so they are rejected instead (documented in the README).
    """
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise KvarnError(
            f"{what}={head_dim} is not supported: the Hadamard rotation needs head_dim in "
            f"{list(SUPPORTED_HEAD_DIMS)}; use a model with one of those head sizes"
        )


@functools.lru_cache(maxsize=16)
def _hadamard_cpu(d: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / d**0.5


def hadamard_matrix(d: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The symmetric orthonormal Sylvester-Hadamard matrix ``[D, D]`` (H @ H.T = I, H = H.T).

    Any power of two works here; the user-facing check is ``check_head_dim``.
    """
    if d < 1 or d & (d - 1):
        raise KvarnError(f"head_dim={d} is not a power of two; the Hadamard rotation needs one")
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
