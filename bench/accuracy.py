"""Accuracy vs memory on the embedded model: calibrated recipes at several budgets against the
uniform KVarN presets and the usual baselines, on held-out text.

    python bench/accuracy.py                       # 2.6 / 3.0 / 3.5 bits, default eval (8 x 1024)
    python bench/accuracy.py --budgets 2.6,3.5 --objective mse --out bench/results/acc-mse

Writes <out>.json (every row, with standard errors) and <out>.png (Δppl vs bits/element), and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kvarn import api
from kvarn.models import load_model

PRESETS = ["kvarn-k4v4-g128", "kvarn-k4v2-g128", "kvarn-k4v2-g128-nosink", "kvarn-k2v2-g128",
           "int4-per-token-head", "kivi-2", "fp8-e4m3"]


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        if r["method"] == "fp16":
            continue
        calibrated = r["method"].startswith("recipe")
        ax.errorbar(r["bits_per_element"], r["delta_ppl_pct"], yerr=r["delta_ppl_pct_se"], fmt="o" if calibrated else "s",
                    color="C0" if calibrated else "C1", capsize=3)
        label = r["method"]
        if calibrated:
            label = "kvarn calibrated " + label.split("recipe-")[-1].replace(".safetensors)", " b")
        ax.annotate(label, (r["bits_per_element"], r["delta_ppl_pct"]),
                    fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("stored bits per K/V element (scales included)")
    ax.set_ylabel("Δ perplexity vs fp16 (%)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_title("kvarn calibrated recipes (blue) vs uniform presets and baselines (orange)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="2.6,3.0,3.5")
    ap.add_argument("--objective", default="fisher", choices=["fisher", "mse"])
    ap.add_argument("--num-samples", type=int, default=None)
    ap.add_argument("--num-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--out", default="bench/results/accuracy")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
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
    plot(data["results"], out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
