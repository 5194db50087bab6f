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


def _style(method: str):
    if method.startswith("recipe"):
        return "o", "C0"
    if method.startswith("turboquant"):
        return "^", "C2"
    return "s", "C1"


def plot(panels, path):
    """``panels``: ``[(seq_len, num_windows, rows)]``, one axis each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.6), squeeze=False)
    for ax, (seq_len, num_windows, rows) in zip(axes[0], panels):
        for r in rows:
            if r["method"] == "fp16":
                continue
            marker, color = _style(r["method"])
            ax.errorbar(r["bits_per_element"], r["delta_ppl_pct"], yerr=r["delta_ppl_pct_se"], fmt=marker,
                        color=color, capsize=3)
            label = r["method"]
            if label == "recipe (smollm2-135m-instruct.safetensors)":
                label = "kvarn calibrated 3 b (shipped)"
            elif label.startswith("recipe"):
                label = "kvarn calibrated " + label.split("recipe-")[-1].replace(".safetensors)", " b")
            ax.annotate(label, (r["bits_per_element"], r["delta_ppl_pct"]),
                        fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("stored bits per K/V element (scales and unquantized layers included)")
        ax.set_ylabel("Δ perplexity vs fp16 (%)")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_title(f"context {seq_len} tokens ({num_windows} windows): kvarn calibrated (blue), "
                     "uniform presets and baselines (orange), TurboQuant (green)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
