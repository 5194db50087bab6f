"""Accuracy vs memory on the embedded model: calibrated recipes at several budgets against the
uniform KVarN presets and the usual baselines, on held-out text.

    python bench/accuracy.py                       # 2.6 / 3.0 / 3.5 bits, default eval (8 x 1024)
    python bench/accuracy.py --budgets 2.6,3.5 --objective mse --out bench/results/acc-mse
    python bench/accuracy.py --seq-len 4096 --out bench/results/accuracy-4k
    python bench/accuracy.py --plot bench/results/accuracy.json,bench/results/accuracy-4k.json

Writes <out>.json (every row, with standard errors) and <out>.png (Δppl vs bits/element), and
prints the table. ``--plot`` only redraws <out>.png from result files (one panel per window length;
files with the same length are merged, e.g. a later run of extra methods on the same windows).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kvarn import api
from kvarn.models import load_model

PRESETS = ["kvarn-k4v4-g128", "kvarn-k4v2-g128", "kvarn-k4v2-g128-nosink", "kvarn-k2v2-g128",
           "int4-per-token-head", "kivi-2", "fp8-e4m3",
           "turboquant-k8v4", "turboquant-4bit-nc", "turboquant-k3v4-nc", "turboquant-3bit-nc"]


def plot(panels, path):
    """Δppl vs bits/element. ``panels``: ``[(seq_len, num_windows, rows)]``, one row of two linear
    axes per window length: every method (left) and the low-loss region (right, where the
    calibrated recipes and the KVarN presets sit; a method above it is marked at the top edge
    with its value). One colour and marker per method across rows, one legend, no point labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def se(r):
        return r.get("delta_ppl_pct_se") or 0.0  # null (one window) draws no bar

    names = []
    for _, _, rows in panels:
        names += [r["method"] for r in rows if not r["method"].startswith("recipe") and r["method"] != "fp16"
                  and r["method"] not in names]
    markers = "s^vDP<>Xph*d"
    palette = [plt.cm.tab20(i) for i in range(2, 20)]  # tab20 without its blues (the recipes' colour)
    style = {m: (palette[(2 * n) % 18 if n < 9 else (2 * n + 1) % 18], markers[n % len(markers)])
             for n, m in enumerate(names)}
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4.4 * len(panels)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.35]})
    legend = {}
    for (seq_len, num_windows, rows), row_axes in zip(panels, axes):
        rows = [r for r in rows if r["method"] != "fp16"]
        recipes = sorted((r for r in rows if r["method"].startswith("recipe")), key=lambda r: r["bits_per_element"])
        others = [r for r in rows if not r["method"].startswith("recipe")]
        zoom_top = max([2.0] + [r["delta_ppl_pct"] + se(r) for r in recipes]
                       + [r["delta_ppl_pct"] + se(r) for r in others if r["delta_ppl_pct"] < 10]) * 1.15
        for k, ax in enumerate(row_axes):
            if recipes:
                h = ax.errorbar([r["bits_per_element"] for r in recipes], [r["delta_ppl_pct"] for r in recipes],
                                yerr=[se(r) for r in recipes], fmt="o-", color="C0", ms=7, lw=1.5, capsize=3, zorder=3)
                legend.setdefault("kvarn calibrated recipes (budgets: the points, left to right)", h)
            for r in others:
                color, marker = style[r["method"]]
                y = r["delta_ppl_pct"]
                if k == 1 and y > zoom_top:  # off the zoomed scale: an arrow at the top edge
                    ax.annotate(f"{y:.0f}%", (r["bits_per_element"], zoom_top), xytext=(0, -22),
                                textcoords="offset points", ha="center", fontsize=7, color=color,
                                arrowprops=dict(arrowstyle="->", color=color, lw=1))
                    continue
                h = ax.errorbar(r["bits_per_element"], y, yerr=se(r), fmt=marker, color=color, ms=6, capsize=3)
                legend.setdefault(r["method"], h)
            xs = [r["bits_per_element"] for r in rows]
            ax.set_xlim(min(xs) - 0.4, max(xs) + 0.4)
            ax.axhline(0, color="gray", lw=0.6)
            ax.set_xlabel("stored bits per K/V element (scales and unquantized layers included)")
            ax.grid(alpha=0.25)
        row_axes[0].set_ylabel(f"context {seq_len}: Δ perplexity vs fp16 (%)")
        row_axes[0].set_title(f"all methods, {num_windows} windows of {seq_len} tokens", fontsize=9)
        row_axes[1].set_ylim(min(-0.5, min(r["delta_ppl_pct"] - se(r) for r in rows) * 1.2), zoom_top)
        row_axes[1].set_title(f"zoom: Δppl up to {zoom_top:.1f}% (± standard error over windows)", fontsize=9)
    fig.legend(list(legend.values()), list(legend.keys()), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3,
               fontsize=8, frameon=False)
    fig.suptitle("Accuracy vs memory on held-out text: kvarn calibrated recipes against uniform presets, "
                 "baselines and TurboQuant", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def panels_of(paths):
    """Result files grouped by window length (rows of later files with the same length added,
    fp16 and repeated methods kept once)."""
    by = {}
    for p in paths:
        d = json.loads(Path(p).read_text())
        seq_len, n, rows = by.get(d["seq_len"], (d["seq_len"], d["num_windows"], []))
        have = {r["method"] for r in rows}
        rows += [r for r in d["results"] if r["method"] not in have]
        by[d["seq_len"]] = (seq_len, min(n, d["num_windows"]), rows)
    return [by[k] for k in sorted(by)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="2.6,3.0,3.5")
    ap.add_argument("--objective", default="fisher", choices=["fisher", "mse"])
    ap.add_argument("--num-samples", type=int, default=None)
    ap.add_argument("--num-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--out", default="bench/results/accuracy")
    ap.add_argument("--plot", default=None, metavar="JSON,JSON", help="only redraw <out>.png from these result files")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.plot:
        plot(panels_of([p for p in args.plot.split(",") if p]), out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
        return
    lm = load_model()
    recipes, calib = [], []
    for b in [float(x) for x in args.budgets.split(",") if x]:
        path = out.parent / f"{out.name}-recipe-{b:g}.safetensors"
        _, rep = api.calibrate(loaded=lm, avg_bits=b, objective=args.objective, num_samples=args.num_samples, output=path)
        print(f"calibrated {b:g} bits: {rep.bits_per_element:.3f} bits/element in {rep.seconds:.1f} s", flush=True)
        recipes.append(path)
        calib.append({"budget": b, "seconds": rep.seconds, "bits_per_element": rep.bits_per_element,
                      "k_bits_mean": rep.k_bits_mean, "v_bits_mean": rep.v_bits_mean})
    t = time.time()
    rep = api.evaluate(loaded=lm, recipe=recipes, methods=[m for m in args.presets.split(",") if m],
                       num_windows=args.num_windows, seq_len=args.seq_len)
    print(api.format_eval_table(rep))
    data = {"objective": args.objective, "calibration": calib, "eval_seconds": time.time() - t, **rep.to_dict()}
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    plot([(data["seq_len"], data["num_windows"], data["results"])], out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
