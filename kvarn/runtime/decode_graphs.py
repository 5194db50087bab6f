"""Decode rows of a step replayed from CUDA graphs: one graph per (layer, batch bucket).

Why: on the H200 a decode layer's kernels take ~0.5 ms (as fast as fp16's attention) but the eager
path costs ~1 ms of host time per layer (~13 launches, three Python Triton launches): a decode step
of burst A took 35 ms against fp16's 17 ms (bench/NOTES.md, 2026-12-03). A replay costs one launch.

What is captured per layer: the staging write of the step's keys/values and the ``decode`` op, over
static buffers of the bucket (``StaticBatch``: the step's metadata, padded; q/k/v/out). Per step,
``stage`` copies the ``DecodeBatch`` into the bucket's buffers once (all layers read them); per
layer, ``run`` copies q/k/v in, replays and copies the output out. Padded rows read nothing
(``q_tile`` 0, ``cur_len`` 0, no first slot) and write their garbage key into ``scratch_slot`` (a
staging slot the table never hands out). The tile store stays eager (it runs only when a tile
completes, and the decode of the completing token reads that tile from staging, not its page).

Not captured: anything while another capture runs (vLLM's own) — then ``run`` executes the same
body eagerly; on the CPU everything runs eagerly (what the tests compare with the plain path).
On by default on CUDA since measured (H200, 2026-12-03: burst A 0.44x → 0.665x fp16 with the
compile fixes, decode step 34.9 → 25.3 ms, burst C 0.92x); ``KVARN_DECODE_GRAPHS=0`` turns it off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..ops.decode import decode
from ..ops.layout import PageLayout

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


def enabled() -> bool:
    return os.environ.get("KVARN_DECODE_GRAPHS", "1") != "0"


@dataclass
class StaticBatch:
    """One bucket's static buffers; ``size`` rows of this step are real, the rest padding."""

    bucket: int
    size: int
    row0: int
    rows: torch.Tensor  # int64 [bucket]: token rows of the real ones (used when row0 < 0)
    block_table: torch.Tensor  # int32 [bucket, width]
    page_start: torch.Tensor
    q_tile: torch.Tensor
    first_slot: torch.Tensor
    cur_slot: torch.Tensor  # int64 here: the staging write's index
    cur_slot32: torch.Tensor
    cur_len: torch.Tensor
    write_pos: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor


class DecodeGraphs:
    """Per engine: a ``StaticBatch`` per bucket and the graphs captured over it."""

    def __init__(self, width: int, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device, scratch_slot: int, max_batch: int = BUCKETS[-1]):
        self.width, self.hq, self.h, self.d, self.dtype = width, num_q_heads, num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.scratch = scratch_slot
        self.max_batch = max_batch
        self.batches: dict[int, StaticBatch] = {}
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.current: StaticBatch | None = None
        self._staged = None  # the DecodeBatch ``current`` holds (staged once, read by every layer)

    def prepare(self, batch) -> StaticBatch | None:
        """``stage`` the step's batch unless it already is (the first layer of a step does it)."""
        if batch is not self._staged:
            self._staged = batch
            self.stage(batch)
        return self.current

    def bucket(self, b: int) -> int | None:
        """The smallest bucket holding ``b`` rows (None: more than the largest: the eager path)."""
        return next((x for x in BUCKETS if x >= b), None) if b <= self.max_batch else None

    def _buffers(self, n: int) -> StaticBatch:
        if n not in self.batches:
            i32 = lambda: torch.zeros(n, dtype=torch.int32, device=self.device)  # noqa: E731
            self.batches[n] = StaticBatch(
                n, 0, -1, torch.zeros(n, dtype=torch.int64, device=self.device),
                torch.zeros(n, self.width, dtype=torch.int32, device=self.device), i32(), i32(), i32(),
                torch.zeros(n, dtype=torch.int64, device=self.device), i32(), i32(),
                torch.zeros(n, dtype=torch.int64, device=self.device),
                torch.zeros(n, self.hq, self.d, dtype=self.dtype, device=self.device),
                torch.zeros(n, self.h, self.d, dtype=self.dtype, device=self.device),
                torch.zeros(n, self.h, self.d, dtype=self.dtype, device=self.device),
                torch.zeros(n, self.hq, self.d, dtype=self.dtype, device=self.device))
        return self.batches[n]

    def stage(self, batch) -> StaticBatch | None:
        """Copy a step's ``DecodeBatch`` into its bucket's buffers (once per step); None when the
        batch is too large or its block table wider than the buffers (then the eager path)."""
        self.current = None
        n = self.bucket(batch.size)
        if n is None or batch.block_table.shape[1] > self.width:
            return None
        sb = self._buffers(n)
        b, w = batch.size, batch.block_table.shape[1]
        sb.size, sb.row0 = b, batch.row0
        sb.rows[:b].copy_(batch.rows)
        sb.block_table[:b, :w].copy_(batch.block_table)
        for dst, src, pad in ((sb.page_start, batch.page_start, 0), (sb.q_tile, batch.q_tile, 0),
                              (sb.first_slot, batch.first_slot, -1), (sb.cur_slot32, batch.cur_slot, self.scratch),
                              (sb.cur_len, batch.cur_len, 0), (sb.write_pos, batch.write_pos, 0)):
            dst[:b].copy_(src)
            dst[b:].fill_(pad)  # padded rows read nothing and write into the scratch slot
        sb.cur_slot.copy_(sb.cur_slot32)
        self.current = sb
        return sb

    def _body(self, layout: PageLayout, pages, staging, sb: StaticBatch, scale: float, softcap) -> None:
        staging[sb.cur_slot, :, :, sb.write_pos] = torch.stack([sb.k, sb.v], 1).to(staging.dtype)
        decode(layout, pages, staging, sb.q, sb.block_table, sb.page_start, sb.q_tile, sb.first_slot, sb.cur_slot32,
               sb.cur_len, scale, softcap, out=sb.out)

    def run(self, layer: int, layout: PageLayout, pages, staging, sb: StaticBatch, q, k, v, scale: float, out,
            softcap=None) -> None:
        """One layer's decode rows: inputs in, graph replayed (captured on first use), output out."""
        b = sb.size
        rows = slice(sb.row0, sb.row0 + b) if sb.row0 >= 0 else sb.rows[:b]
        for dst, src in ((sb.q, q), (sb.k, k), (sb.v, v)):
            dst[:b].copy_(src[rows])
        if not self._capturable(staging):
            self._body(layout, pages, staging, sb, scale, softcap)
        else:
            key = (layer, sb.bucket, pages.data_ptr(), staging.data_ptr())
            graph = self.graphs.get(key)
            if graph is None:
                graph = self.graphs[key] = self._capture(layout, pages, staging, sb, scale, softcap)
            graph.replay()
        out[rows] = sb.out[:b].to(out.dtype)

    def _capturable(self, t: torch.Tensor) -> bool:
        return t.is_cuda and not torch.cuda.is_current_stream_capturing()

    def _capture(self, layout, pages, staging, sb, scale, softcap) -> torch.cuda.CUDAGraph:
        # the first run compiles the Triton kernels and warms the allocator, off the capture; it does
        # this step's work, which the replay then repeats (same inputs, same result)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._body(layout, pages, staging, sb, scale, softcap)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):  # vLLM's threads go on
            self._body(layout, pages, staging, sb, scale, softcap)
        return graph
