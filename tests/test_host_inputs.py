"""The step plan's host inputs: vLLM's host copies when it has them, the device tensors otherwise,
and ``to_device`` giving the same values as a plain copy (no vLLM needed)."""

from types import SimpleNamespace

import pytest
import torch

from kvarn.runtime import vllm_plugin
from kvarn.runtime.paged import to_device


def _common(seq_lens, table, host_seq=None):
    return SimpleNamespace(seq_lens=seq_lens, block_table_tensor=table, _seq_lens_cpu=host_seq)


def test_tracked_host_table_and_seq_lens_are_preferred():
    g = torch.Generator().manual_seed(7)
    table = torch.randint(1, 900, (5, 11), generator=g, dtype=torch.int32)
    host = table.clone()
    host[1, 3] = -5  # distinguishable from the device table: proves which one was read
    vllm_plugin._host_block_tables[table.data_ptr()] = host
    try:
        seq, rows = vllm_plugin._Compat.host_step_inputs(
            _common(torch.tensor([9, 8, 7, 6, 5]), table, torch.tensor([3, 2, 1, 4, 5])), 3)
    finally:
        vllm_plugin._host_block_tables.pop(table.data_ptr())
    assert seq == [3, 2, 1]
    assert rows.shape == (3, 11) and rows[1, 3] == -5 and torch.equal(rows[0], table[0])


def test_untracked_inputs_fall_back_to_the_step_tensors():
    table = torch.randint(1, 900, (4, 6), dtype=torch.int32)
    seq, rows = vllm_plugin._Compat.host_step_inputs(_common(torch.tensor([17, 3, 250, 1]), table), 4)
    assert seq == [17, 3, 250, 1] and torch.equal(rows, table)
    # a tracked host table of another width (another engine's) is not taken
    vllm_plugin._host_block_tables[table.data_ptr()] = torch.zeros(4, 9, dtype=torch.int32)
    try:
        _, rows = vllm_plugin._Compat.host_step_inputs(_common(torch.tensor([1, 1, 1, 1]), table), 2)
    finally:
        vllm_plugin._host_block_tables.pop(table.data_ptr())
    assert torch.equal(rows, table[:2])


def test_to_device_values_and_dtype():
    vals = torch.randint(-2**31, 2**31 - 1, (37,)).tolist()
    for dtype in (torch.int32, torch.int64):
        t = to_device(vals, dtype, "cpu")
        assert t.dtype == dtype and t.tolist() == torch.tensor(vals, dtype=dtype).tolist()
    assert to_device([], torch.int64, "cpu").numel() == 0


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_decode_batch_columns_start_on_16_bytes_and_hold_the_plan(n):
    """Triton compiles a variant per pointer alignment: every metadata column of a step's decode
    batch starts on 16 bytes whatever the batch size and table width, and holds the plan's values."""
    from kvarn.runtime.paged import StagingTable, decode_batch, staging_slots

    g = 4
    table = StagingTable(staging_slots(n, True), g, True)
    blocks = [[10 * i + j + 1 for j in range(6)] for i in range(n)]
    lens = [5 + 3 * i for i in range(n)]  # several table widths
    table.plan([(i, i + 1, 0, s, blocks[i]) for i, s in enumerate(lens)])  # prefill (one row each: decode rows)
    steps = table.plan([(i, i + 1, s, s + 1, blocks[i]) for i, s in enumerate(lens)])
    batch = decode_batch(steps, g, True, "cpu")
    cols = [batch.rows, batch.block_table, batch.page_start, batch.q_tile, batch.first_slot, batch.cur_slot,
            batch.cur_len, batch.write_pos]
    assert all(c.data_ptr() % 16 == 0 for c in cols), [c.data_ptr() % 16 for c in cols]
    assert batch.q_tile.tolist() == [s // g for s in lens]
    assert batch.cur_len.tolist() == [s + 1 - (s // g) * g for s in lens]
    assert batch.write_pos.tolist() == [s - (s // g) * g for s in lens]
    assert batch.block_table[:, 0].tolist() == [b[0] for b in blocks]
    assert batch.store_index.tolist() == [i for i, s in enumerate(lens) if (s + 1) % g == 0]
