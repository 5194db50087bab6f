"""Where a serving decode step's attention time goes, without vLLM: kvarn's ``attend_layer`` for
one decode step of B sequences (the path the vLLM backend runs per layer) against the decode op
alone and bf16 SDPA, on a CUDA GPU.

    python bench/attend_step_gpu.py [--format k4v2,mix] [--B 64] [--ctx 8192] [--out DIR]

Shape: Llama-3.1-8B attention (8 KV heads, 32 query heads, head_dim 128, tile 128). Sequences sit at
``ctx`` + a random offset in their tile (so a few complete a tile each step, as in a real batch).
Per format, medians over steps:

* ``plan_ms``: host work once per step (``StagingTable.plan`` + ``decode_batch``: the builder's part)
* ``layer_eager_ms``: one layer's ``attend_layer`` with synchronisation around it (launch + GPU)
* ``layer_in_step_ms``: 32 layers back to back, one sync at the end, divided by 32 — what a layer
  costs inside a step when launches can overlap the GPU (max of host and device time)
* ``layer_host_ms``: the host time to issue one layer's work (no sync: Python + launches)
* ``decode_op_ms``: the decode op alone as a CUDA-graph replay (the kernels' time)
* ``graph_ms``: the whole decode-row path of one layer captured in a CUDA graph (no tile completed
  in the step) and replayed, or the capture's error
* ``bf16_ms``: torch SDPA over a bf16 cache, graph replay (the baseline kernel)

Writes ``DIR/attend_step.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels_gpu import D, FORMATS, G, H, HQ, bench, bf16_decode, random_pages  # noqa: E402
from kvarn.ops.layout import PageLayout  # noqa: E402
from kvarn.runtime.paged import StagingTable, _attend_decode, attend_layer, decode_batch, staging_slots  # noqa: E402

DEV = os.environ.get("KVARN_BENCH_DEVICE", "cuda")
LAYERS = 32


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def setup(lay: PageLayout, bsz: int, ctx: int, seed: int = 0):
    """Pages holding every sequence's tiles, a staging table that knows their open tails."""
    g = torch.Generator().manual_seed(seed)
    start = [ctx + int(torch.randint(0, G - 8, (1,), generator=g)) for _ in range(bsz)]
    max_blocks = (max(start) + 64) // G + 2
    nblocks = bsz * max_blocks + 1
    pages = random_pages(lay, nblocks, seed)
    perm = (torch.randperm(nblocks - 1, generator=g) + 1).tolist()
    blocks = [perm[i * max_blocks:(i + 1) * max_blocks] for i in range(bsz)]
    table = StagingTable(staging_slots(bsz, True), G, True)
    table.plan([(i, i + 1, 0, s, blocks[i]) for i, s in enumerate(start)])  # the prefills: slots assigned
    staging = torch.randn(table.num_slots + 8, 2, H, G, D, dtype=torch.float16, device=DEV)
    return pages, staging, table, blocks, start


def step_plan(table, blocks, pos):
    steps = table.plan([(i, i + 1, p, p + 1, blocks[i]) for i, p in enumerate(pos)])
    return steps, decode_batch(steps, G, True, torch.device(DEV))


def measure(name: str, lay: PageLayout, bsz: int, ctx: int, n_steps: int) -> dict:
    pages, staging, table, blocks, pos = setup(lay, bsz, ctx)
    q = torch.randn(bsz, HQ, D, dtype=torch.bfloat16, device=DEV)
    k = torch.randn(bsz, H, D, dtype=torch.bfloat16, device=DEV)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    scale = D ** -0.5
    plan_ms, eager_ms, host_ms, in_step_ms = [], [], [], []
    for s in range(n_steps):
        t = time.perf_counter()
        steps, batch = step_plan(table, blocks, pos)
        plan_ms.append(1000 * (time.perf_counter() - t))
        _sync()
        t = time.perf_counter()
        attend_layer(lay, True, pages, staging, steps, q, k, v, scale, out, batch=batch)
        host_ms.append(1000 * (time.perf_counter() - t))
        _sync()
        eager_ms.append(1000 * (time.perf_counter() - t))
        if s % 4 == 0:  # a whole step's layers back to back (same layer data: the host path is the same)
            _sync()
            t = time.perf_counter()
            for _ in range(LAYERS):
                attend_layer(lay, True, pages, staging, steps, q, k, v, scale, out, batch=batch)
            _sync()
            in_step_ms.append(1000 * (time.perf_counter() - t) / LAYERS)
        pos = [p + 1 for p in pos]
    row = {"format": name, "B": bsz, "ctx": ctx, "steps": n_steps,
           "plan_ms": statistics.median(plan_ms), "layer_eager_ms": statistics.median(eager_ms),
           "layer_host_ms": statistics.median(host_ms), "layer_in_step_ms": statistics.median(in_step_ms)}

    from kvarn.ops.decode import decode

    _, batch = step_plan(table, blocks, pos)
    pos = [p + 1 for p in pos]  # a step is planned once (a plan that completes a tile frees its slot)
    row["decode_op_ms"] = bench(lambda: decode(lay, pages, staging, q, batch.block_table, batch.page_start,
                                               batch.q_tile, batch.first_slot, batch.cur_slot, batch.cur_len, scale))
    # the decode-row path in a graph: a step where no tile completes (a store would be another graph)
    while True:
        steps, batch = step_plan(table, blocks, pos)
        pos = [p + 1 for p in pos]
        if not batch.store_index.numel():
            break
    try:
        row["graph_ms"] = bench(lambda: _attend_decode(lay, pages, staging, batch, q, k, v, scale, out))
    except Exception as e:  # noqa: BLE001 - report why it cannot be captured
        row["graph_ms"] = None
        row["graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="k4v2,mix")
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    rows = []
    base_ms = bf16_decode(args.B, args.ctx)[0] if DEV == "cuda" else None
    for name in args.format.split(","):
        prior = torch.randn(H, D) * 0.3
        lay = PageLayout(FORMATS[name], prior, prior)
        row = measure(name, lay, args.B, args.ctx, args.steps)
        row["bf16_ms"] = base_ms
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attend_step.json").write_text(json.dumps({"device": torch.cuda.get_device_name() if DEV == "cuda" else DEV,
                                                     "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    cols = ("plan_ms", "layer_host_ms", "layer_eager_ms", "layer_in_step_ms", "decode_op_ms", "graph_ms", "bf16_ms")
    print("\n| format | B | ctx | " + " | ".join(cols) + " |\n|" + "---|" * (3 + len(cols)))
    for r in rows:
        print(f"| {r['format']} | {r['B']} | {r['ctx']} | "
              + " | ".join("-" if r.get(c) is None else f"{r[c]:.3f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
