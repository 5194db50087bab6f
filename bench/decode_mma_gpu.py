"""Decode on a CUDA GPU: the register-fed Gluon kernel (``kvarn.ops.decode.mma``) against kvarn's
Triton decode kernel and bf16 FlashAttention decode, all measured in this run.

Shape: Llama-3.1-8B attention (8 KV heads, 32 query heads, head_dim 128), tile 128, one layer, the
K4V2 preset's format (the burst's ``kvarn-k4v2``). Each row is one decode step of the op (paged
part + staged fp16 part + combine), replayed from a CUDA graph (``kernels_gpu.bench``). Before
timing, each kvarn variant's output is checked against the reference on a small irregular batch.

    python bench/decode_mma_gpu.py [--out DIR] [--shapes 64x8192,8x32768]

Prints a table last and writes ``DIR/decode_mma_h200.json``: rows ``{"B", "ctx", "variant", "ms",
"x_bf16", "packed_GBps", "rel_err"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels_gpu import FORMATS, bench, bf16_decode, check_decode, decode_inputs, kvarn_decode_fn  # noqa: E402

from kvarn.ops.layout import PageLayout  # noqa: E402

VARIANTS = {  # name: decode op options
    "triton": dict(mma=False),
    "mma": dict(mma=True),
    "mma-pipe": dict(mma="pipe"),  # the next tile's bytes copied ahead into shared memory
    "mma-r168": dict(mma=True, maxnreg=168),  # 12 warps per SM instead of 8, some spill
    "mma-r128": dict(mma=True, maxnreg=128),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--shapes", default="64x8192,160x8192,256x4096,64x16384,8x32768")
    ap.add_argument("--split-x", default="1,2", help="multiples of the default split count to time for mma")
    args = ap.parse_args()
    from kvarn.ops.decode import triton as tri

    lay = PageLayout(FORMATS["k4v2"], torch.zeros(8, 128), torch.zeros(8, 128))
    rows, errs = [], {}
    for name, cfg in VARIANTS.items():
        try:
            errs[name] = check_decode(lay, **cfg)
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            errs[name] = float("nan")
            print(f"check {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        print(f"check {name}: relative error {errs[name]:.2e}", flush=True)
    for shape in args.shapes.split(","):
        bsz, ctx = (int(x) for x in shape.split("x"))
        bf_ms, _, bf_name = bf16_decode(bsz, ctx)
        rows.append(dict(B=bsz, ctx=ctx, variant=f"bf16 sdpa ({bf_name})", ms=bf_ms, x_bf16=1.0))
        pages, staging, meta, nbytes = decode_inputs(lay, bsz, ctx)
        base_splits = tri.layout_splits(lay, bsz, meta["block_table"].shape[1], pages.device)
        for name, cfg in VARIANTS.items():
            if errs.get(name, float("nan")) != errs.get(name) or errs[name] > 3e-3:
                continue  # wrong or broken: not timed
            for sx in ([1] if name == "triton" else [int(x) for x in args.split_x.split(",")]):
                splits = min(tri.MAX_SPLITS, base_splits * sx)
                try:
                    ms = bench(kvarn_decode_fn(lay, pages, staging, meta, bsz, splits=splits, **cfg))
                except Exception as e:  # noqa: BLE001
                    print(f"{name} B={bsz} ctx={ctx}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows.append(dict(B=bsz, ctx=ctx, variant=name, splits=splits, ms=ms, x_bf16=bf_ms / ms,
                                 packed_GBps=nbytes / ms / 1e6, rel_err=errs[name]))
                print(f"B={bsz} ctx={ctx} {name} splits={splits}: {ms:.3f} ms ({bf_ms / ms:.2f}x bf16 "
                      f"{bf_ms:.3f} ms, {nbytes / ms / 1e6:.0f} GB/s)", flush=True)
        del pages, staging, meta
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_mma_h200.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))
    print("\n| B | ctx | variant | splits | ms | x bf16 | packed GB/s | rel err |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['ctx']} | {r['variant']} | {r.get('splits', '')} | {r['ms']:.3f} | {r['x_bf16']:.2f} | "
              f"{r.get('packed_GBps', 0):.0f} | {r.get('rel_err', 0):.1e} |")


if __name__ == "__main__":
    main()
