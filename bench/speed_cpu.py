"""Wall time of the default `kvarn calibrate` and `kvarn eval` on this machine (model cached).

    python bench/speed_cpu.py [--repeats 3] [--out bench/results/speed_cpu.json]

Targets (issue 2): calibrate <= 60 s, eval table <= 180 s on the 2-core CPU. Runs each command as a
subprocess, the way a user does (so model loading and imports are counted), and reports medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/speed_cpu.json")
    args = ap.parse_args()
    kvarn = [sys.executable, "-m", "kvarn"]
    with tempfile.TemporaryDirectory() as d:
        recipe = str(Path(d) / "r.safetensors")
        subprocess.run(kvarn + ["calibrate", "--num-samples", "1", "--seq-len", "384", "-o", recipe], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # warm: converts/caches the model
        cal = [timed(kvarn + ["calibrate", "-o", recipe]) for _ in range(args.repeats)]
        ev = [timed(kvarn + ["eval", "--recipe", recipe]) for _ in range(max(1, args.repeats - 1))]
    rows = [("kvarn calibrate (default)", cal, 60.0), ("kvarn eval (default table)", ev, 180.0)]
    print(f"{'command':<28} {'median s':>9} {'min s':>7} {'max s':>7} {'target s':>9}  ok")
    for name, xs, target in rows:
        med = statistics.median(xs)
        print(f"{name:<28} {med:>9.1f} {min(xs):>7.1f} {max(xs):>7.1f} {target:>9.0f}  {'yes' if med <= target else 'NO'}")
    data = {"cpu_count": os.cpu_count(), "results": [{"command": n, "seconds": xs, "median": statistics.median(xs), "target": t} for n, xs, t in rows]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
