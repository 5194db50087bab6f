"""Captured accumulators → per-layer/head statistics the allocation and the runtime use."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import KVCapture

OBJECTIVES = ("fisher", "mse")


@dataclass
class KVStats:
    """Per layer L, KV head H, channel D and candidate code width.

    k_log_std, v_log_std: ``[L, H, D]`` per-channel log-std after rotation (runtime priors).
    k_err, v_err: ``[L, H, nb]`` predicted cost of storing K (resp. V) of that head at
    ``candidate_bits[j]``, the other tensor exact, in the chosen objective's units (additive over
    heads and layers by assumption). mse tables are kept too, for reports.
    """

    candidate_bits: tuple[int, ...]
    k_log_std: torch.Tensor
    v_log_std: torch.Tensor
    k_err: torch.Tensor
    v_err: torch.Tensor
    k_mse: torch.Tensor
    v_mse: torch.Tensor
    objective: str
    tokens: int


def compute_stats(cap: KVCapture, objective: str = "fisher") -> KVStats:
    """``fisher``: mean over tokens of ``(g·δ)²`` (first-order change of the loss, squared);
    ``mse``: attention-output squared error relative to that layer's output energy."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective has to be one of {list(OBJECTIVES)} but got {objective!r}")
    energy = cap.out_energy.clamp_min(1e-30)[:, :, None]
    rel = {kind: (cap.mse[kind] / energy).float() for kind in "kv"}
    if objective == "fisher":
        err = {kind: (cap.fisher[kind] / max(cap.tokens, 1)).float() for kind in "kv"}
    else:
        err = rel
    return KVStats(
        candidate_bits=tuple(cap.cfg.candidate_bits),
        k_log_std=cap.log_std("k"), v_log_std=cap.log_std("v"),
        k_err=err["k"], v_err=err["v"], k_mse=rel["k"], v_mse=rel["v"],
        objective=objective, tokens=cap.tokens,
    )
