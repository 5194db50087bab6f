"""Bit allocation: budget respected, optimal on convex instances (vs exhaustive search)."""

import itertools

import pytest
import torch

from kvarn.allocation import _hull, allocate_bits
from kvarn.errors import KvarnError
from kvarn.quant.formats import LayerFormat, TensorFormat, bits_per_element, head_tile_bytes

K = TensorFormat((), "channel", "none", clip=True)
V = TensorFormat((), "token", "static", clip=True)
CAND = (2, 3, 4, 8)


def test_hull_drops_dominated_and_concave_points():
    # cost, err: point 2 is dominated (costs more, no better); point 1 lies above segment 0→3
    assert _hull([1, 2, 3, 4], [10, 9.5, 9.6, 1]) == [0, 3]
    assert _hull([1, 2, 3], [10, 5, 4]) == [0, 1, 2]


def _convex_errors(L, H, seed):
    g = torch.Generator().manual_seed(seed)
    # error ~ a * 4^-bits: convex and decreasing in bits, as RTN error is
    a = torch.rand(L, H, 1, generator=g) * 10 + 0.1
    bits = torch.tensor(CAND, dtype=torch.float32)
    return a * 4.0 ** (-bits), torch.rand(L, H, 1, generator=g) * 10 * 4.0 ** (-bits)


def _layout_bits(kb, vb, L, H, D=64, tile=128):
    layers = [LayerFormat(D, tile, K.with_bits(kb[l]), V.with_bits(vb[l])) for l in range(L)]
    return bits_per_element(layers)


@pytest.mark.parametrize("avg_bits", [2.6, 3.0, 3.6, 5.0])
def test_budget_respected_and_tight(avg_bits):
    k_err, v_err = _convex_errors(6, 3, seed=int(avg_bits * 10))
    a = allocate_bits(k_err, v_err, CAND, K, V, 128, 64, avg_bits)
    achieved = _layout_bits(a.k_bits.tolist(), a.v_bits.tolist(), 6, 3)
    assert achieved == pytest.approx(a.bits_per_element)
    assert achieved <= avg_bits + 1e-9
    # tight: no single one-step upgrade would still fit (else greedy stopped early)
    smallest_step = min(head_tile_bytes(K, 3, 128, 64) - head_tile_bytes(K, 2, 128, 64),
                        head_tile_bytes(V, 3, 128, 64) - head_tile_bytes(V, 2, 128, 64)) / 128
    slack_bytes = (avg_bits - achieved) / 8 * 6 * 3 * 64 * 2
    all_max = bool((a.k_bits == 16).all() and (a.v_bits == 16).all())
    assert all_max or slack_bytes < smallest_step * 8 + 1e-9


def test_more_budget_never_more_error():
    k_err, v_err = _convex_errors(5, 2, seed=1)
    errs = [allocate_bits(k_err, v_err, CAND, K, V, 128, 64, b).predicted_error for b in (2.5, 2.8, 3.2, 4.0, 6.0)]
    assert all(a >= b for a, b in zip(errs, errs[1:])), errs


def test_matches_exhaustive_search_on_small_instances():
    L, H = 2, 1
    options = list(CAND) + [16]
    for seed in range(4):
        k_err, v_err = _convex_errors(L, H, seed)
        for avg_bits in (2.6, 3.3, 4.4):
            a = allocate_bits(k_err, v_err, CAND, K, V, 128, 64, avg_bits)
            best = float("inf")
            for combo in itertools.product(options, repeat=2 * L * H):
                kb = [[combo[l]] for l in range(L)]
                vb = [[combo[L + l]] for l in range(L)]
                if _layout_bits(kb, vb, L, H) > avg_bits + 1e-9:
                    continue
                e = sum(0.0 if b == 16 else float(k_err[l, 0, CAND.index(b)]) for l, b in enumerate(combo[:L]))
                e += sum(0.0 if b == 16 else float(v_err[l, 0, CAND.index(b)]) for l, b in enumerate(combo[L:]))
                best = min(best, e)
            # Greedy on convex hulls is optimal up to the last, partially-fitting upgrade.
            assert a.predicted_error <= best * 1.5 + 1e-12, (seed, avg_bits, a.predicted_error, best)


def test_prefers_the_sensitive_head():
    k_err = torch.tensor([[[1.0, 0.5, 0.25, 0.01]], [[100.0, 50.0, 25.0, 1.0]]])  # layer 1 is 100x more sensitive
    v_err = torch.full((2, 1, 4), 1e-6)
    a = allocate_bits(k_err, v_err, CAND, K, V, 128, 64, 3.0)
    assert a.k_bits[1, 0] > a.k_bits[0, 0]


def test_budget_below_minimum_is_a_clear_error():
    k_err, v_err = _convex_errors(2, 2, 0)
    with pytest.raises(KvarnError) as ei:
        allocate_bits(k_err, v_err, CAND, K, V, 128, 64, 2.0)
    assert "--avg-bits" in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_groups_hold_equal_bytes_per_layer(tp):
    """With the heads' errors skewed towards one rank, a plain allocation gives that rank more
    bytes; with ``head_groups_for_tp`` every layer's ranks hold equal bytes up to one width step
    (vLLM pads each layer's page to its largest rank), within the total budget, and each layer
    keeps the bytes the free allocation gave it (up to that step), at an error no lower than it."""
    from kvarn.parallel import head_groups_for_tp

    L, H, D = 4, 8, 64
    k_err, v_err = _convex_errors(L, H, seed=tp)
    k_err[:, : H // tp] *= 50  # rank 0's heads are the sensitive ones
    free = allocate_bits(k_err, v_err, CAND, K, V, 128, D, 3.2)
    groups = head_groups_for_tp(H, tp)
    bal = allocate_bits(k_err, v_err, CAND, K, V, 128, D, 3.2, head_groups=groups)

    def layer_rank_bytes(a, l):
        return [sum(head_tile_bytes(K, int(a.k_bits[l, h]), 128, D) + head_tile_bytes(V, int(a.v_bits[l, h]), 128, D)
                    for h in g) / 128 for g in groups]

    step = max(head_tile_bytes(K, b2, 128, D) - head_tile_bytes(K, b1, 128, D) for b1, b2 in zip(CAND, CAND[1:])) / 128
    assert any(max(layer_rank_bytes(free, l)) - min(layer_rank_bytes(free, l)) > step for l in range(L)), \
        "the skewed instance is not unbalanced without groups"
    for l in range(L):
        bb = layer_rank_bytes(bal, l)
        assert max(bb) - min(bb) <= step + 1e-9, f"layer {l}: ranks hold {bb} bytes per token (one step is {step})"
        assert sum(bb) <= sum(layer_rank_bytes(free, l)) + 1e-9, f"layer {l} got more than the free allocation gave it"
    assert bal.bits_per_element <= 3.2 + 1e-9 and bal.predicted_error >= free.predicted_error - 1e-12
    assert head_groups_for_tp(2, 4) == [[0], [1]]
    with pytest.raises(KvarnError, match="--tp-size 3"):
        head_groups_for_tp(8, 3)


def _keys_cheap_to_lose(L, H, seed):
    """Keys whose predicted error barely drops with width (values dominate): with no floor the
    allocator leaves many keys at 2 bits, so a floor has something to change."""
    k_err, v_err = _convex_errors(L, H, seed)
    return k_err * 1e-3, v_err * 10


@pytest.mark.parametrize("floor, avg_bits", [(3, 3.0), (3, 3.5), (4, 3.5), (4, 4.4), (8, 6.0)])
def test_key_floor_respected_and_budget_met(floor, avg_bits):
    L, H = 6, 3
    k_err, v_err = _keys_cheap_to_lose(L, H, seed=floor)
    free = allocate_bits(k_err, v_err, CAND, K, V, 128, 64, avg_bits)
    assert bool((free.k_bits < floor).any()), "the instance does not put keys below the floor without one"
    a = allocate_bits(k_err, v_err, CAND, K, V, 128, 64, avg_bits, min_k_bits=floor)
    assert int(a.k_bits.min()) >= floor, a.k_bits
    achieved = _layout_bits(a.k_bits.tolist(), a.v_bits.tolist(), L, H)
    assert achieved == pytest.approx(a.bits_per_element) and achieved <= avg_bits + 1e-9
    # the values take what the floor leaves: no one-step value upgrade still fits
    step = min(head_tile_bytes(V, b2, 128, 64) - head_tile_bytes(V, b1, 128, 64)
               for b1, b2 in zip(CAND, CAND[1:])) / 128
    slack_bytes = (avg_bits - achieved) / 8 * L * H * 64 * 2
    assert bool((a.v_bits == 16).all()) or slack_bytes < step + 1e-9, (achieved, a.v_bits)
    assert a.predicted_error >= free.predicted_error - 1e-12  # a constraint never lowers the optimum


def test_key_floor_with_tensor_parallel_groups():
    from kvarn.parallel import head_groups_for_tp

    k_err, v_err = _keys_cheap_to_lose(4, 8, seed=5)
    a = allocate_bits(k_err, v_err, CAND, K, V, 128, 64, 3.5, head_groups=head_groups_for_tp(8, 2), min_k_bits=4)
    assert int(a.k_bits.min()) >= 4 and a.bits_per_element <= 3.5 + 1e-9


@pytest.mark.parametrize("floor, avg_bits, needles", [
    (4, 3.0, ("--min-k-bits 4", "3.375 bits/element", "--avg-bits 3", "--avg-bits 3.375 or more", "--min-k-bits 3")),
    (8, 3.5, ("--min-k-bits 8", "5.375", "--avg-bits 5.375 or more", "--min-k-bits 4")),
    (3, 2.6, ("--min-k-bits 3", "2.875", "--min-k-bits 2")),
    (5, 4.0, ("--min-k-bits 5", "[2, 3, 4, 8]")),
    (True, 4.0, ("--min-k-bits True",)),
])
def test_key_floor_the_budget_cannot_hold_is_a_clear_error(floor, avg_bits, needles):
    k_err, v_err = _convex_errors(2, 2, 0)
    with pytest.raises(KvarnError) as ei:
        allocate_bits(k_err, v_err, CAND, K, V, 128, 64, avg_bits, min_k_bits=floor)
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)
