"""Does a serving decode compile Triton kernels while it serves? One decode step per batch size,
B = 1 .. N (as a burst's decode batch grows when prefills complete), each with its own context
length (so the block table's width changes too), timed on the host around the first call.

    python bench/decode_variants_gpu.py [--max-batch 64] [--ctx 8192] [--format k4v2]

A first call far above the next one (> 50 ms) compiled a kernel variant. The engine-start warm-up
runs first (``--no-warm-up`` skips it), so what is counted is what a serving engine would compile. Writes
``DIR/decode_variants.json`` and prints the batch sizes that compiled and the seconds spent.
Context: the H200 burst A of 2026-12-03 spent 12-14 s of 57 s in such compiles (bench/NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attend_step_gpu import DEV, _sync, setup, step_plan  # noqa: E402
from kernels_gpu import D, FORMATS, H, HQ  # noqa: E402
from kvarn.ops.layout import PageLayout  # noqa: E402
from kvarn.ops.warmup import warm_up  # noqa: E402
from kvarn.runtime.paged import _attend_decode  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--format", default="k4v2", choices=sorted(FORMATS))
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--no-warm-up", action="store_true", help="skip the engine-start kernel warm-up")
    args = ap.parse_args()
    fmt = FORMATS[args.format]
    prior = torch.zeros(H, D) if fmt.v.normalize == "static" else None
    lay = PageLayout(fmt, prior, prior)
    if not args.no_warm_up:  # as a serving engine does when it builds its model (kvarn.ops.warmup)
        t = time.perf_counter()
        warm_up([lay], HQ, torch.bfloat16, DEV)
        print(f"warm-up: {time.perf_counter() - t:.1f} s", flush=True)
    rows = []
    for b in range(1, args.max_batch + 1):
        ctx = args.ctx + 128 * (b % 7)  # block tables of several widths
        pages, staging, table, blocks, pos = setup(lay, b, ctx, seed=b)
        q = torch.randn(b, HQ, D, dtype=torch.bfloat16, device=DEV)
        k = torch.randn(b, H, D, dtype=torch.bfloat16, device=DEV)
        v = torch.randn_like(k)
        out = torch.empty_like(q)
        times = []
        for s in range(2):
            steps, batch = step_plan(table, blocks, [p + s for p in pos])
            _sync()
            t = time.perf_counter()
            _attend_decode(lay, pages, staging, batch, q, k, v, D ** -0.5, out)
            _sync()
            times.append(1000 * (time.perf_counter() - t))
        rows.append({"batch": b, "ctx": ctx, "first_ms": round(times[0], 2), "second_ms": round(times[1], 2)})
        if times[0] > 50:
            print(f"B={b} ctx={ctx}: first call {times[0]:.0f} ms, second {times[1]:.1f} ms", flush=True)
    slow = [r for r in rows if r["first_ms"] > 50 and r["batch"] > 1]
    res = {"device": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "format": args.format, "rows": rows,
           "compiles_after_first_batch": len(slow), "compile_s": round(sum(r["first_ms"] for r in slow) / 1000, 2)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_variants.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"first batch (B=1): {rows[0]['first_ms']:.0f} ms; later first calls over 50 ms: {len(slow)} "
          f"({res['compile_s']} s) at B = {[r['batch'] for r in slow]}")
    print("median second call ms:", sorted(r["second_ms"] for r in rows)[len(rows) // 2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
