"""Throughput against capacity, one point per (burst, method) from the latest lease that measured it,
both as multiples of the fp16 of the same lease: ``bench/results/serve_h200.json`` → a PNG.

    python bench/serve_plot.py [--json bench/results/serve_h200.json] [--out bench/results/serve_h200.png]

No GPU needed (it reads the JSON ``bench/serve_gpu.py`` writes). The dashed box is issue 8's
goal region: capacity ≥ 4.5x and throughput ≥ fp16's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def latest_rows(rows: list[dict]) -> list[dict]:
    """The last row of each (burst, method) in file order (rows are appended lease by lease); a
    method is the cache name without its ``+option`` suffixes (``kvarn-k4v2+graphs`` is ``kvarn-k4v2``)."""
    last = {}
    for r in rows:
        if r.get("x_fp16") is not None:
            last[(r["burst"], r["kv"].split("+")[0])] = r
    return list(last.values())


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"A": "o", "B": "s", "C": "^"}
    colors = {}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.axvline(1.0, color="0.6", lw=0.8)
    ax.add_patch(plt.Rectangle((4.5, 1.0), 1.5, 2.0, fill=False, ls="--", ec="tab:green", lw=1))
    for r in rows:
        color = colors.setdefault(r["kv"].split("+")[0], f"C{len(colors)}")
        ax.scatter(r["capacity_x_fp16"], r["x_fp16"], marker=markers.get(r["burst"], "x"), color=color, s=60,
                   zorder=3)
        if r["kv"] != "fp16":  # fp16 is (1, 1) by definition
            lease = str(r.get("lease", "")).removeprefix("2026-")
            ax.annotate(f"{r['burst']}: {r['x_fp16']:.2f}x ({lease})", (r["capacity_x_fp16"], r["x_fp16"]),
                        textcoords="offset points", xytext=(6, 4), fontsize=8)
    for kv, color in colors.items():
        ax.scatter([], [], color=color, label=kv)
    for burst, m in markers.items():
        ax.scatter([], [], marker=m, color="0.3", label=f"burst {burst}")
    ax.set_xlabel("KV capacity (x fp16, tokens)")
    ax.set_ylabel("throughput (x fp16 of the same lease)")
    ax.set_xlim(0, 6)
    ax.set_ylim(0, max(1.6, max(r["x_fp16"] for r in rows) + 0.2))
    ax.set_title("vLLM 0.26 on one H200, Llama-3.1-8B shape (latest lease per point)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="bench/results/serve_h200.json")
    ap.add_argument("--out", default="bench/results/serve_h200.png")
    args = ap.parse_args()
    rows = latest_rows(json.loads(Path(args.json).read_text())["rows"])
    print(f"wrote {plot(rows, Path(args.out))} ({len(rows)} points)")


if __name__ == "__main__":
    main()
