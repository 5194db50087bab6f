"""The fp16 staging pool (``kvarn.runtime.paged.StagingTable``): a fixed size that an engine's
schedule never outgrows, and what happens when a pool is too small — defined, counted and logged,
never silently less exact.

The engine is simulated: sequences arrive, prefill in chunks cut by a token budget, decode, finish
and give their blocks back (reused at once, as vLLM's free list does); a running sequence now and
then sits a step out. Randomised with fixed seeds; every step's plan is checked."""

from __future__ import annotations

import logging
import random

import pytest

from kvarn.errors import KvarnError
from kvarn.runtime.paged import StagingTable, staging_slots

G = 4


class Engine:
    def __init__(self, max_seqs: int, rng: random.Random, num_blocks: int = 400):
        self.max_seqs, self.rng = max_seqs, rng
        self.free = list(range(num_blocks - 1, 0, -1))  # block 0 is the null block
        self.running = []  # dicts: prompt, total, done (tokens computed), blocks
        self.finished = 0

    def admit(self):
        while len(self.running) < self.max_seqs and self.rng.random() < 0.6:
            prompt = self.rng.randint(1, 6 * G)
            self.running.append({"prompt": prompt, "total": prompt + self.rng.randint(1, 3 * G), "done": 0,
                                 "blocks": []})

    def schedule(self, budget: int):
        """``(q_start, q_end, ctx, seq, blocks)`` per scheduled sequence: decodes first, then prefills
        (the last one cut by the budget); a sequence sits out with probability 0.1."""
        order = sorted(self.running, key=lambda r: r["done"] < r["prompt"])
        seqs, at, chosen = [], 0, []
        for r in order:
            if budget <= 0 or self.rng.random() < 0.1:
                continue
            n = 1 if r["done"] >= r["prompt"] else min(r["prompt"] - r["done"], budget)
            budget -= n
            seq = r["done"] + n
            while len(r["blocks"]) < -(-seq // G):
                r["blocks"].append(self.free.pop())
            seqs.append((at, at + n, r["done"], seq, list(r["blocks"])))
            chosen.append((r, seq))
            at += n
        return seqs, chosen

    def advance(self, chosen, table: StagingTable | None = None):
        for r, seq in chosen:
            r["done"] = seq
            if seq >= r["total"]:
                self.running.remove(r)
                self.free.extend(reversed(r["blocks"]))
                self.finished += 1
                if table is not None:  # what the plugin does with vLLM's finished_req_ids
                    table.release(r["blocks"])


def _check_step(table: StagingTable, steps) -> None:
    """Slots in range; a slot written by one sequence is neither read nor written by another."""
    owner = {}
    for i, st in enumerate(steps):
        used = {s for s in (st.old_slot, st.new_slot, st.first_slot) if s is not None}
        for s in used:
            assert 0 <= s < table.num_slots, f"slot {s} outside the pool of {table.num_slots}"
            assert owner.setdefault(s, i) == i, f"slot {s} shared by sequences {owner[s]} and {i} in one step"


@pytest.mark.parametrize("seed", range(4))
def test_pool_sized_by_staging_slots_never_grows_nor_loses_a_first_tile(seed):
    rng = random.Random(seed)
    max_seqs = rng.randint(2, 8)
    eng = Engine(max_seqs, rng)
    size = staging_slots(max_seqs, True)
    table = StagingTable(size, G, True)
    for _ in range(400):
        eng.admit()
        seqs, chosen = eng.schedule(rng.randint(4, 24))
        if not seqs:
            continue
        steps = table.plan(seqs)
        _check_step(table, steps)
        for st in steps:  # every live sequence past its first tile reads it in fp16
            if st.ctx >= G:
                assert st.first_slot is not None, f"step {table.step}: a live sequence lost its fp16 first tile"
        eng.advance(chosen, table)
    assert eng.finished > 20, "the simulation finished too few sequences to exercise block reuse"
    assert table.num_slots == size and table.first_tiles_lost == 0


def test_exhausted_pool_keeps_a_first_tile_quantized_counted_and_logged(caplog):
    table = StagingTable(2, G, True)
    a, b = [11, 12], [21, 22]
    table.plan([(0, 5, 0, 5, a)])  # A: first tile + open tail: both slots
    with caplog.at_level(logging.WARNING, logger="kvarn.runtime.paged"):
        steps = table.plan([(0, 1, 5, 6, a), (1, 5, 0, 4, b)])  # B completes its first tile: no slot left
        assert not steps[1].first_write and steps[1].first_slot is None
        steps = table.plan([(0, 1, 4, 5, b)])  # A sits out: B's new tail takes the idle first-tile copy of A
        assert steps[0].first_slot is None and steps[0].new_slot is not None
        assert table.first_tiles_lost == 1  # B's, noticed when B reads tile 0 from its page
        steps = table.plan([(0, 1, 6, 7, a), (1, 1, 5, 6, b)])
        assert steps[0].first_slot is None and steps[0].old_slot is not None
    assert table.first_tiles_lost == 2 and table.num_slots == 2
    assert sum("first tile quantized" in r.getMessage() for r in caplog.records) == 1, "the first loss is logged"
    table.plan([(0, 1, 7, 8, a), (1, 1, 6, 7, b)])
    assert table.first_tiles_lost == 2, "a lost first tile is counted once per sequence"


def test_open_tail_without_a_slot_is_a_clear_error():
    table = StagingTable(1, G, False)
    table.plan([(0, 3, 0, 3, [5])])
    with pytest.raises(KvarnError, match="no fp16 staging slot for the open tile"):
        table.plan([(0, 1, 3, 4, [5]), (1, 3, 0, 2, [6])])


def test_stale_entries_go_before_live_ones():
    """A finished sequence's entries (not read for longest) are evicted first, so a live sequence
    keeps its first tile even when the pool is full."""
    table = StagingTable(4, G, True)
    table.plan([(0, 6, 0, 6, [1, 2])])  # old: first tile + tail (then never scheduled again)
    table.plan([(0, 6, 0, 6, [3, 4])])  # live: first tile + tail
    steps = table.plan([(0, 1, 6, 7, [3, 4]), (1, 6, 0, 6, [5, 6])])  # a third needs two slots
    assert steps[0].first_slot is not None and steps[1].first_write
    steps = table.plan([(0, 1, 7, 8, [3, 4]), (1, 2, 6, 7, [5, 6])])
    assert all(st.first_slot is not None for st in steps) and table.first_tiles_lost == 0


def test_release_drops_tails_and_keeps_first_tiles_for_prefix_hits_until_needed():
    table = StagingTable(2, G, True)
    done = [1, 2]
    table.plan([(0, 6, 0, 6, done)])  # first tile + tail
    table.release(done)  # the request finished
    assert [e.kind for e in table.entries.values()] == ["first"], "the finished tail was not dropped"
    steps = table.plan([(0, 3, 4, 7, [1, 9])])  # a prefix-cache hit on block 1: its fp16 first tile is there
    assert steps[0].first_slot is not None and table.first_tiles_lost == 0
    table.release([1, 9])
    live = [5, 6]
    table.plan([(0, 6, 0, 6, live)])  # needs two slots: the freed tail's, then the released first tile's
    steps = table.plan([(0, 1, 6, 7, live)])
    assert steps[0].first_slot is not None and 1 not in table.entries
