"""Which part of calibration buys the accuracy: one change at a time from the default recipe,
all at the same memory budget, on the default held-out evaluation.

    python bench/ablation.py [--avg-bits 2.6] [--out bench/results/ablation]

Variants: default (fisher objective, static V scale, no K normalization, values clipped, keys
min/max) · mse objective · no clipping · keys clipped too (the default before 2026-12-03) · V with
KVarN per-tile normalization · K with KVarN per-tile normalization; plus the uniform K4V2 and K2V2
presets for reference. Writes <out>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvarn import api
from kvarn.models import load_model

VARIANTS = {
    "default": {},
    "objective-mse": {"objective": "mse"},
    "no-clip": {"clip": False},
    "clip-both": {"clip": True},
    "v-tile-norm": {"v_normalize": "tile"},
    "k-tile-norm": {"k_normalize": "tile"},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--avg-bits", type=float, default=2.6)
    ap.add_argument("--num-windows", type=int, default=8)
    ap.add_argument("--out", default="bench/results/ablation")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lm = load_model()
    paths, calib = [], {}
    for name, kw in VARIANTS.items():
        path = out.parent / f"{out.name}-{name}.safetensors"
        _, rep = api.calibrate(loaded=lm, avg_bits=args.avg_bits, output=path, progress=False, **kw)
        calib[name] = {"bits_per_element": rep.bits_per_element, "seconds": rep.seconds, **kw}
        print(f"{name}: {rep.bits_per_element:.3f} bits/element, calibrated in {rep.seconds:.1f} s", flush=True)
        paths.append(path)
    rep = api.evaluate(loaded=lm, recipe=paths, methods=["kvarn-k4v2-g128", "kvarn-k2v2-g128"], num_windows=args.num_windows)
    print(api.format_eval_table(rep))
    out.with_suffix(".json").write_text(json.dumps({"avg_bits": args.avg_bits, "variants": calib, **rep.to_dict()}, indent=2))
    print(f"wrote {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
