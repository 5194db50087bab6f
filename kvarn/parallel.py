"""How tensor parallelism splits a model's KV heads over ranks (vLLM's rule), in one place: the
allocator balances its budget over these groups and the runtime builds each rank's pages from them."""

from __future__ import annotations

from .errors import KvarnError


def rank_kv_heads(num_kv_heads: int, tp_size: int, rank: int) -> list[int]:
    """The KV heads tensor-parallel rank ``rank`` of ``tp_size`` holds, as vLLM splits them:
    consecutive blocks of ``num_kv_heads / tp_size`` heads, or — when there are fewer KV heads
    than ranks — one head per rank, each replicated on ``tp_size / num_kv_heads`` ranks."""
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is outside tensor-parallel size {tp_size}")
    if tp_size <= num_kv_heads:
        if num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over {tp_size} ranks")
        per = num_kv_heads // tp_size
        return list(range(rank * per, (rank + 1) * per))
    if tp_size % num_kv_heads:
        raise ValueError(f"{tp_size} ranks cannot replicate {num_kv_heads} KV heads evenly")
    return [rank // (tp_size // num_kv_heads)]


def head_groups_for_tp(num_kv_heads: int, tp_size: int) -> list[list[int]]:
    """The KV heads of each tensor-parallel rank (as vLLM splits them), deduplicated: ranks that
    replicate one head (TP > KV heads) share a group."""
    try:
        groups = [rank_kv_heads(num_kv_heads, tp_size, r) for r in range(tp_size)]
    except ValueError as e:
        raise KvarnError(f"--tp-size {tp_size}: {e}; use a size that divides {num_kv_heads} or a multiple of it") from None
    return [g for i, g in enumerate(groups) if g not in groups[:i]]
