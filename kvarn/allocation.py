"""Bit allocation: per layer, KV head and tensor (K/V), pick a code width under a memory budget.

Pure function of the statistics and the format: a multiple-choice knapsack, solved greedily on
each item's lower convex hull of (bytes per token, predicted error). Starting from every item at
its cheapest width, the upgrade with the largest error reduction per extra byte is applied while
it fits the budget. Costs come from ``head_tile_bytes`` — the same numbers ``bytes_per_token``
adds up — so the allocation is always a layout the runtime can store.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from .errors import KvarnError
from .preflight import check_key_floor
from .quant.formats import FP16_BITS, LayerFormat, TensorFormat, bits_per_element, head_tile_bytes


@dataclass
class Allocation:
    k_bits: torch.Tensor  # [L, H] int
    v_bits: torch.Tensor  # [L, H] int
    predicted_error: float
    bits_per_element: float


def _hull(costs: list[float], errs: list[float]) -> list[int]:
    """Indices of the lower convex hull of points, by increasing cost, error decreasing."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], errs[i]))
    pts = []
    for i in order:
        if pts and errs[i] >= errs[pts[-1]]:
            continue  # costs more and is no better
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # b is above the segment a→i: drop it
            if (errs[b] - errs[a]) * (costs[i] - costs[a]) >= (errs[i] - errs[a]) * (costs[b] - costs[a]):
                pts.pop()
            else:
                break
        pts.append(i)
    return pts


def allocate_bits(
    k_err: torch.Tensor, v_err: torch.Tensor, candidate_bits: tuple[int, ...],
    k_format: TensorFormat, v_format: TensorFormat, tile: int, head_dim: int,
    avg_bits: float, allow_fp16: bool = True, head_groups: list[list[int]] | None = None,
    min_k_bits: int | None = None,
) -> Allocation:
    """Choose ``[L, H]`` K and V widths minimising the summed predicted error such that the
    average stored bits per element (scales included) is at most ``avg_bits``.

    ``head_groups`` (e.g. ``kvarn.parallel.head_groups_for_tp``): tensor-parallel ranks must hold
    equal bytes per token in every layer (vLLM gives all ranks one page size per layer). The free
    allocation decides how many bytes each layer gets; each layer's bytes are then split over the
    groups by their heads' share and allocated per (layer, group), so ranks differ by less than one
    upgrade step per layer (the runtime pads that remainder) and layers keep the budget the
    calibration gave them.

    ``min_k_bits`` (``--min-k-bits``, one of ``candidate_bits``): no key is stored narrower; the
    values take what the budget leaves. The error objective prices what perplexity sees and let
    retrieval (passkey) down with 2-bit keys; a floor is the guard."""
    L, H, _ = k_err.shape
    check_key_floor(min_k_bits, candidate_bits, avg_bits, "--avg-bits", k_format, v_format, tile, head_dim)
    groups = head_groups or [list(range(H))]
    if len(groups) > 1:
        free = allocate_bits(k_err, v_err, candidate_bits, k_format, v_format, tile, head_dim, avg_bits, allow_fp16,
                             min_k_bits=min_k_bits)
        k_bits = torch.zeros(L, H, dtype=torch.int64)
        v_bits = torch.zeros(L, H, dtype=torch.int64)
        err = 0.0
        for l in range(L):
            layer_bytes = sum(head_tile_bytes(k_format, int(free.k_bits[l, h]), tile, head_dim)
                              + head_tile_bytes(v_format, int(free.v_bits[l, h]), tile, head_dim) for h in range(H))
            layer_bits = 8.0 * layer_bytes / tile / (H * head_dim * 2)  # the layer's share, as bits/element
            for g in groups:
                part = allocate_bits(k_err[l:l + 1, g], v_err[l:l + 1, g], candidate_bits, k_format, v_format, tile,
                                     head_dim, layer_bits, allow_fp16, min_k_bits=min_k_bits)
                k_bits[l, g], v_bits[l, g] = part.k_bits[0], part.v_bits[0]
                err += part.predicted_error
        layers = [LayerFormat(head_dim, tile, k_format.with_bits(k_bits[l].tolist()),
                              v_format.with_bits(v_bits[l].tolist())) for l in range(L)]
        return Allocation(k_bits, v_bits, err, bits_per_element(layers))
    options = list(candidate_bits) + ([FP16_BITS] if allow_fp16 else [])
    items = []  # (kind, layer, head, [bits], [cost bytes/token], [err])
    for kind, err, fmt in (("k", k_err, k_format), ("v", v_err, v_format)):
        allowed = [b for b in options if kind == "v" or min_k_bits is None or b >= min_k_bits]
        for l in range(L):
            for h in range(H):
                costs = [head_tile_bytes(fmt, b, tile, head_dim) / tile for b in allowed]
                errs = [float(err[l, h, candidate_bits.index(b)]) if b != FP16_BITS else 0.0 for b in allowed]
                hull = _hull(costs, errs)
                items.append((kind, l, h, [allowed[i] for i in hull], [costs[i] for i in hull], [errs[i] for i in hull]))
    budget = avg_bits / 8.0 * L * H * head_dim * 2  # bytes per token, all layers
    used = sum(it[4][0] for it in items)
    if used > budget + 1e-9:
        min_bits = 8.0 * used / (L * H * head_dim * 2)
        raise KvarnError(
            f"--avg-bits {avg_bits:g} is below the smallest layout this format allows "
            f"({min_bits:.3f} bits/element at {min(candidate_bits)}-bit codes); raise --avg-bits or lower --compression"
        )
    level = [0] * len(items)
    heap = []

    def push(i):
        kind, l, h, bits, costs, errs = items[i]
        j = level[i]
        if j + 1 < len(bits):
            gain = (errs[j] - errs[j + 1]) / max(costs[j + 1] - costs[j], 1e-12)
            heapq.heappush(heap, (-gain, i))

    for i in range(len(items)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        kind, l, h, bits, costs, errs = items[i]
        j = level[i]
        extra = costs[j + 1] - costs[j]
        if used + extra > budget + 1e-9:
            continue  # does not fit; cheaper upgrades elsewhere may
        used += extra
        level[i] = j + 1
        push(i)
    k_bits = torch.zeros(L, H, dtype=torch.int64)
    v_bits = torch.zeros(L, H, dtype=torch.int64)
    total_err = 0.0
    for i, (kind, l, h, bits, costs, errs) in enumerate(items):
        (k_bits if kind == "k" else v_bits)[l, h] = bits[level[i]]
        total_err += errs[level[i]]
    layers = [LayerFormat(head_dim, tile, k_format.with_bits(k_bits[l].tolist()), v_format.with_bits(v_bits[l].tolist())) for l in range(L)]
    return Allocation(k_bits, v_bits, total_err, bits_per_element(layers))
