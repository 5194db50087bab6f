"""Iterative variance normalization (KVarN step 2), in log space.

A tile ``x [..., G, D]`` is balanced by a row scale ``r [..., G, 1]`` and a column scale
``c [..., 1, D]`` so that ``x / (r * c)`` has rows and columns of similar standard deviation.
Each iteration is a column step then a row step (Sinkhorn-like). Because a step rescales only the
axis it fits, the column step reduces to ``c = std over rows of (x / r)`` and the row step to
``r = std over columns of (x / c)``: no running products of scales are needed. After each
iteration the mean log column scale is moved into the row scales (``(r k, c / k)`` normalizes
alike), which keeps the pair from drifting towards the eps floor. The iteration
does not shrink the imbalance monotonically on real activations, so the best-balanced pair seen
(including the start) is kept per tile.
"""

from __future__ import annotations

import torch

_EPS = 1e-6


def _std(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """Population std. Written out because ``torch.std`` is ~30x slower on small CPU tensors."""
    centered = x - x.mean(dim=dim, keepdim=True)
    return (centered * centered).mean(dim=dim, keepdim=keepdim).sqrt()


def imbalance(x: torch.Tensor) -> torch.Tensor:
    """Std of the log row stds plus std of the log column stds, per tile ``[...]``; 0 = balanced."""
    log_row = torch.log(_std(x, -1) + _EPS)
    log_col = torch.log(_std(x, -2) + _EPS)
    return _std(log_row, -1) + _std(log_col, -1)


def _std_of(y: torch.Tensor, dim: int, scratch: torch.Tensor) -> torch.Tensor:
    """``_std(y, dim, keepdim=True)`` computed in ``scratch`` (same shape as y), same operations."""
    torch.sub(y, y.mean(dim=dim, keepdim=True), out=scratch)
    return scratch.mul_(scratch).mean(dim=dim, keepdim=True).sqrt_()


def _scaled_std(x, log_s, dim, scratch):
    """``_std(x * exp(-log_s), dim, keepdim=True)`` with the product formed in ``scratch``."""
    torch.mul(x, torch.exp(-log_s), out=scratch)
    return _std_of(scratch, dim, scratch)


def _imbalance_of(x, log_r, log_c, y, scratch):
    """``imbalance(x * exp(-log_r - log_c))`` with the product in ``y`` and the centring in ``scratch``."""
    torch.exp(-log_r - log_c, out=y).mul_(x)
    log_row = torch.log(_std_of(y, -1, scratch)[..., 0] + _EPS)
    log_col = torch.log(_std_of(y, -2, scratch)[..., 0, :] + _EPS)
    return _std(log_row, -1) + _std(log_col, -1)


def variance_normalize(
    x: torch.Tensor, iters: int = 8, log_col_prior: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit log-space row/column scales for tiles ``x [..., G, D]``.

    Returns ``(log_r [..., G, 1], log_c [..., 1, D])`` with ``x / exp(log_r + log_c)`` the
    best-balanced tile among the start point and the ``iters`` column+row steps.
    ``log_col_prior`` (broadcastable to ``[..., 1, D]``, e.g. calibrated per-channel log-std) is the
    starting column scale: the first iteration's column step starts from ``x / r(prior)`` rather
    than from ``x``. Without it the start is the identity.

    The tile-sized temporaries live in two scratch tensors reused in place (fresh full-size
    temporaries cost more than the arithmetic on CPU); the operations are those of ``_std`` and
    ``imbalance``, in the same order.
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    x = x.float()
    y, scratch = torch.empty_like(x), torch.empty_like(x)
    log_r = torch.zeros(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    log_c = torch.zeros(*x.shape[:-2], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    if log_col_prior is not None:
        log_c = log_c + log_col_prior.to(device=x.device, dtype=x.dtype)
        log_r = torch.log(_scaled_std(x, log_c, -1, scratch) + _EPS)
    best_r, best_c = log_r, log_c
    best = _imbalance_of(x, log_r, log_c, y, scratch)
    for _ in range(iters):
        log_c = torch.log(_scaled_std(x, log_r, -2, scratch) + _EPS)
        log_r = torch.log(_scaled_std(x, log_c, -1, scratch) + _EPS)
        # (r k, c / k) is the same normalization for any k: pin the mean log column scale to 0 so
        # the pair cannot drift until x / c nears the eps floor (seen on tiny tiles).
        shift = log_c.mean(dim=-1, keepdim=True)
        log_c, log_r = log_c - shift, log_r + shift
        score = _imbalance_of(x, log_r, log_c, y, scratch)
        better = score < best
        best = torch.where(better, score, best)
        better = better[..., None, None]
        best_r = torch.where(better, log_r, best_r)
        best_c = torch.where(better, log_c, best_c)
    return best_r, best_c
