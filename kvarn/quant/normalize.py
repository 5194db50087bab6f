"""Iterative variance normalization (KVarN step 2), in log space.

A tile ``x [..., G, D]`` is balanced by a row scale ``r [..., G, 1]`` and a column scale
``c [..., 1, D]`` so that ``x / (r * c)`` has rows and columns of similar standard deviation.
Alternate column and row steps (Sinkhorn-like); after every step the imbalance is measured and the
best-balanced pair of scales seen so far is kept, per tile, because the iteration does not
decrease the imbalance monotonically on real activations.
"""

from __future__ import annotations

import torch

_EPS = 1e-6


def imbalance(x: torch.Tensor) -> torch.Tensor:
    """Std of the log row stds plus std of the log column stds, per tile ``[...]``; 0 = balanced."""
    log_row = torch.log(x.std(dim=-1) + _EPS)
    log_col = torch.log(x.std(dim=-2) + _EPS)
    return log_row.std(dim=-1) + log_col.std(dim=-1)


def variance_normalize(
    x: torch.Tensor, iters: int = 8, log_col_prior: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit log-space row/column scales for tiles ``x [..., G, D]``.

    Returns ``(log_r [..., G, 1], log_c [..., 1, D])`` with ``x / exp(log_r + log_c)`` the
    best-balanced tile among the start point and the ``iters`` column+row steps.
    ``log_col_prior`` (broadcastable to ``[..., 1, D]``, e.g. calibrated per-channel log-std) is the
    starting column scale; without it the start is the identity.
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    x = x.float()
    log_r = torch.zeros(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    log_c = torch.zeros(*x.shape[:-2], 1, x.shape[-1], dtype=x.dtype, device=x.device)
    if log_col_prior is not None:
        log_c = log_c + log_col_prior.to(x.dtype)
    best_r, best_c = log_r.clone(), log_c.clone()
    best = imbalance(x * torch.exp(-log_r - log_c))
    for _ in range(iters):
        xn = x * torch.exp(-log_r - log_c)
        log_c = log_c + torch.log(xn.std(dim=-2, keepdim=True) + _EPS)
        xn = x * torch.exp(-log_r - log_c)
        log_r = log_r + torch.log(xn.std(dim=-1, keepdim=True) + _EPS)
        score = imbalance(x * torch.exp(-log_r - log_c))
        better = score < best
        best = torch.where(better, score, best)
        better = better[..., None, None]
        best_r = torch.where(better, log_r, best_r)
        best_c = torch.where(better, log_c, best_c)
    return best_r, best_c
