"""Kernel benchmark on a CUDA GPU: kvarn's Triton decode (and store) against bf16 FlashAttention decode.

Shape: Llama-3.1-8B attention (8 KV heads, 32 query heads, head_dim 128), tile 128, one layer.
Rows: decode for B in {8, 64, 160, 256} x ctx in {4k, 8k, 32k} for the uniform K4V2 preset
("k4v2": Hadamard + per-tile normalization, the seed's format) and a recipe-like mix of widths
("mix": K 2/3/4 bits per head with no normalization, V 2/3/4 bits with the static calibrated
scale, ~3.4 bits/element, like a calibrated recipe); the bf16 baseline is torch SDPA (flash) over a
contiguous cache, the 4 query heads of a group as 4 query rows (GQA without copying K/V), measured
in the same run; plus the device-to-device copy bandwidth, and the store kernel (µs per tile and as
a share of a decode step). Page contents are random codes with valid fp16 scales (speed does not
depend on the values; correctness is the tests' job: tests/ops).

    python bench/kernels_gpu.py [--out DIR] [--quick] [--sweep-only]

Prints a table last and writes ``DIR/kernels_h200.json``: rows ``{"op", "B", "ctx", "format", "ms",
"x_bf16", "packed_GBps", ...}``. Timing: ``triton.testing.do_bench`` medians (CUDA events).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvarn.ops.layout import PageLayout  # noqa: E402
from kvarn.quant.formats import LayerFormat, TensorFormat, bits_per_element  # noqa: E402

H, HQ, D, G = 8, 32, 128, 128
# KVARN_BENCH_DEVICE=cpu with --tiny: a dry run of this script through the Triton interpreter
DEV = os.environ.get("KVARN_BENCH_DEVICE", "cuda")
FORMATS = {
    "k4v2": LayerFormat(D, G, TensorFormat((4,) * H, "channel", "tile"), TensorFormat((2,) * H, "token", "tile")),
    "mix": LayerFormat(D, G, TensorFormat((4, 3, 4, 4, 3, 2, 4, 3), "channel", "none", clip=True),
                       TensorFormat((3, 2, 3, 3, 2, 4, 4, 2), "token", "static", clip=True)),
}
DEFAULT_FORMATS = ("k4v2", "mix")
# Diagnostics for the mix's cost (--formats): uniform widths with the recipe's normalizations
# (one head group, one launch) and a 2/4-bit mix without 3-bit heads (three groups).
_u = lambda kb, vb: LayerFormat(D, G, TensorFormat((kb,) * H, "channel", "none", clip=True),  # noqa: E731
                                TensorFormat((vb,) * H, "token", "static", clip=True))
FORMATS.update({
    "k4v2s": _u(4, 2), "k3v3s": _u(3, 3), "k4v4s": _u(4, 4), "k3v2s": _u(3, 2), "k2v4s": _u(2, 4),
    "mix24": LayerFormat(D, G, TensorFormat((4, 2, 4, 4, 2, 2, 4, 2), "channel", "none", clip=True),
                         TensorFormat((2, 2, 2, 2, 2, 4, 4, 2), "token", "static", clip=True)),
})


def bench(fn, warmup=25, rep=60, graph=True):
    """Median ms of ``fn`` (CUDA events); with ``graph`` its launches are captured once and replayed,
    so host launch overhead stays out (as in a CUDA-graph serving step)."""
    import triton

    fn()  # compile / warm up outside the capture
    if DEV == "cpu":
        t0 = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t0)
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return triton.testing.do_bench(g.replay, warmup=warmup, rep=rep, return_mode="median")
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    x = torch.empty((2 * 1024**3 if DEV == "cuda" else 2**20) // 2, dtype=torch.float16, device=DEV).normal_()
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), graph=False)  # a graph-replayed copy read 2.77 TB/s, a plain one 4.27
    return 2 * x.numel() * 2 / ms / 1e6  # GB/s, read + write


def random_pages(lay: PageLayout, nblocks: int, gen_seed=0):
    """uint8 pages with random codes and sane fp16 scale/zero/norm fields."""
    torch.manual_seed(gen_seed)
    pages = torch.randint(0, 256, (nblocks, lay.nbytes), dtype=torch.uint8, device=DEV)
    for (kind, h), seg in lay.fields.items():
        for name, (o, nb) in seg.items():
            if name == "codes":
                continue
            f = pages[:, o:o + nb].view(torch.float16)
            if name == "scale":
                f.uniform_(0.01, 0.1)
            elif name == "zero":
                f.normal_(0, 0.5)
            else:
                f.uniform_(0.8, 1.25)
    return pages


def decode_inputs(lay, bsz, ctx, seed=0):
    """Pages of ``ctx`` tokens per sequence: first tile fp16 (staging), tiles 1..n-1 packed, 1 open token."""
    n_tiles = ctx // G  # the query sits in tile n_tiles (its open tile holds it alone)
    nblocks = bsz * n_tiles + 1
    pages = random_pages(lay, nblocks, seed)
    perm = (torch.randperm(nblocks - 1, device=DEV) + 1).to(torch.int32)
    table = perm.reshape(bsz, n_tiles).contiguous()
    staging = torch.randn(2 * bsz + 2, 2, H, G, D, dtype=torch.float16, device=DEV)
    i32 = lambda x: torch.as_tensor(x, dtype=torch.int32, device=DEV)  # noqa: E731
    meta = dict(block_table=table, page_start=i32([1] * bsz), q_tile=i32([n_tiles] * bsz),
                first_slot=i32(list(range(bsz))), cur_slot=i32(list(range(bsz, 2 * bsz))), cur_len=i32([1] * bsz))
    bytes_read = bsz * ((n_tiles - 1) * lay.nbytes + (G + 1) * H * D * 2 * 2)
    return pages, staging, meta, bytes_read


def bf16_decode(bsz, ctx):
    """The faster of two SDPA (flash) layouts: the 4 query heads of a group as 4 query rows over
    [B, 8, ctx, D], or [B, 32, 1, D] queries with enable_gqa. Returns (ms, bytes, layout name)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    k = torch.randn(bsz, H, ctx + 1, D, dtype=torch.bfloat16, device=DEV)
    v = torch.randn_like(k)
    q_rows = torch.randn(bsz, H, HQ // H, D, dtype=torch.bfloat16, device=DEV)
    q_gqa = torch.randn(bsz, HQ, 1, D, dtype=torch.bfloat16, device=DEV)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    results = []
    for name, fn in (("rows", lambda: sdpa(q_rows, k, v, scale=D ** -0.5)),
                     ("gqa", lambda: sdpa(q_gqa, k, v, scale=D ** -0.5, enable_gqa=True))):
        def run(fn=fn):
            backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
            with sdpa_kernel(backends if DEV == "cuda" else [SDPBackend.MATH]):
                return fn()
        try:
            results.append((bench(run), name))
        except Exception as e:  # noqa: BLE001 - a layout this torch cannot run fast
            print(f"  bf16 {name} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
    nbytes = 2 * k.numel() * 2
    del q_rows, q_gqa, k, v
    ms, name = min(results)
    return ms, nbytes, name


def check_decode(lay, bsz=3, ctx=640, **cfg):
    """Relative error of the kernel against the reference on random pages (a spot check)."""
    from kvarn.ops.decode import reference as ref
    from kvarn.ops.decode import triton as tri

    pages, staging, meta, _ = decode_inputs(lay, bsz, ctx)
    q = torch.randn(bsz, HQ, D, dtype=torch.bfloat16, device=DEV)  # as timed: the same compiled kernels
    m = meta
    if "splits" in cfg:
        cfg["num_splits"] = cfg.pop("splits")
    args = (lay, pages, staging, q, m["block_table"], m["page_start"], m["q_tile"], m["first_slot"], m["cur_slot"],
            m["cur_len"], D ** -0.5)
    want = ref.decode(*args)
    got = tri.decode(*args, **cfg)
    return ((got.float() - want).norm() / want.norm()).item()


def kvarn_decode_fn(lay, pages, staging, meta, bsz, **cfg):
    from kvarn.ops.decode import triton as tri

    q = torch.randn(bsz, HQ, D, dtype=torch.bfloat16, device=DEV)
    out = torch.empty_like(q)
    splits = cfg.pop("splits", None) or tri.layout_splits(lay, bsz, meta["block_table"].shape[1], torch.device(DEV))
    ws = (torch.empty(splits + 1, bsz, HQ, D, device=DEV), torch.empty(splits + 1, bsz, HQ, device=DEV))
    m = meta
    return lambda: tri.decode(lay, pages, staging, q, m["block_table"], m["page_start"], m["q_tile"],
                              m["first_slot"], m["cur_slot"], m["cur_len"], D ** -0.5, out=out, workspace=ws, **cfg)


def store_fn(lay, n_tiles, num_warps=None):
    from kvarn.ops.store import triton as store_tri

    pages = torch.zeros(n_tiles + 1, lay.nbytes, dtype=torch.uint8, device=DEV)
    k = torch.randn(n_tiles, H, G, D, dtype=torch.bfloat16, device=DEV)
    v = torch.randn_like(k)
    ids = torch.arange(1, n_tiles + 1, dtype=torch.int32, device=DEV)
    return lambda: store_tri.store_tiles(lay, pages, k, v, ids, num_warps=num_warps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--quick", action="store_true", help="B in {8, 64}, ctx in {8k, 32k} only")
    ap.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help="formats of the grid (comma-separated)")
    ap.add_argument("--no-store", action="store_true")
    ap.add_argument("--streams", action="store_true", help="also time formats of several head groups with each "
                                                            "group's launch on its own stream")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="dry run: tiny shapes, few variants")
    ap.add_argument("--variants", default=None, help="JSON list of decode configurations to sweep instead")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if DEV == "cuda":
        dev = torch.cuda.get_device_properties(0)
        print(f"device {dev.name}, {dev.multi_processor_count} SMs, torch {torch.__version__}", flush=True)
    sweep_shapes = ((64, 8192), (8, 32768)) if not args.tiny else ((2, 512), (1, 1024))
    rows = []
    t0 = time.time()
    gbps = copy_bandwidth()
    rows.append({"op": "copy", "GBps": round(gbps, 1)})
    print(f"copy bandwidth {gbps:.0f} GB/s (read + write)", flush=True)

    # -- variant sweep: pick the kernel configuration per batch regime ----------------------------
    # prefetch: scale vectors one step ahead; num_stages: Triton's cp.async pipeline depth for the
    # code bytes; maxnreg: a register cap for more programs per SM (at 255 registers only 2 fit)
    variants = []
    for pf in (True, False):
        for warps, bt, stages in ([(2, bt, st) for bt in (32, 64) for st in (2, 3, 4)]
                                  + [(4, bt, st) for bt in (64, 128) for st in (3, 4)]):
            variants.append(dict(cvt=2, bt=bt, num_warps=warps, num_stages=stages, prefetch=pf, maxnreg=None))
    variants += [dict(cvt=2, bt=128, num_warps=8, num_stages=3, prefetch=True, maxnreg=None),
                 dict(cvt=1, bt=128, num_warps=4, num_stages=3, prefetch=True, maxnreg=None),
                 dict(cvt=2, bt=64, num_warps=4, num_stages=3, prefetch=True, maxnreg=168),
                 dict(cvt=2, bt=32, num_warps=1, num_stages=3, prefetch=True, maxnreg=None)]
    if args.variants:  # a JSON list of configurations replaces the built-in sweep
        variants = json.loads(args.variants)
    best = {}
    lay = PageLayout(FORMATS["k4v2"], None, None)
    if args.tiny:  # the interpreter has no inline PTX
        variants = [dict(v, cvt=1) for v in variants[:2]] + [dict(variants[-1], cvt=1)]
    checked = []
    for var in variants:
        # 3 x 2048 tokens with 2 splits specializes the kernel as the timed shapes do (one compile)
        try:
            err = check_decode(lay, bsz=3, ctx=2048 if not args.tiny else 640, splits=2, **var)
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append({"op": "check", "format": "k4v2", "rel_err": err, **var})
        print(f"check k4v2 {var}: rel err {err}", flush=True)
        if isinstance(err, float) and err < 1e-2:
            checked.append(var)
    variants = checked
    for bsz, ctx in sweep_shapes:
        pages, staging, meta, nbytes = decode_inputs(lay, bsz, ctx)
        base_ms, _, _ = bf16_decode(bsz, ctx)
        rows.append({"op": "sweep_bf16", "B": bsz, "ctx": ctx, "ms": round(base_ms, 4)})
        results = []
        for var in variants:
            from kvarn.ops.decode import triton as tri

            auto = tri.default_splits(bsz, H, meta["block_table"].shape[1])
            for splits in sorted({auto, min(tri.MAX_SPLITS, 2 * auto), min(tri.MAX_SPLITS, 4 * auto)}):
                cfg = dict(var, splits=splits)
                try:
                    ms = bench(kvarn_decode_fn(lay, pages, staging, meta, bsz, **dict(cfg)))
                except Exception as e:  # noqa: BLE001 - report and go on with the other variants
                    print(f"  variant {cfg} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                results.append((ms, cfg))
                rows.append({"op": "decode_variant", "B": bsz, "ctx": ctx, "format": "k4v2", "ms": round(ms, 4),
                             "x_bf16": round(base_ms / ms, 3), "packed_GBps": round(nbytes / ms / 1e6, 1), **cfg})
        (out_dir / "kernels_h200.json").write_text(json.dumps(rows, indent=1))  # partial results survive
        results.sort(key=lambda r: r[0])
        best[bsz] = results[0][1]
        print(f"B={bsz} ctx={ctx}: bf16 {base_ms:.3f} ms; best {results[0][0]:.3f} ms {results[0][1]}; "
              f"worst {results[-1][0]:.3f} ms", flush=True)
        for ms, cfg in results[:8]:
            print(f"    {ms:.3f} ms  x{base_ms / ms:.2f}  {cfg}", flush=True)
        del pages, staging, meta
        torch.cuda.empty_cache()
    print(f"sweep done in {time.time() - t0:.0f} s", flush=True)

    def cfg_for(bsz):
        keys = sorted(best)
        c = dict(best[keys[-1]] if bsz > 16 else best[keys[0]])
        c.pop("splits", None)  # the split count follows the shape (default_splits) beyond the swept points
        return c

    grid_b = (8, 64) if args.quick else (8, 64, 160, 256)
    grid_ctx = (8192, 32768) if args.quick else (4096, 8192, 32768)
    if args.tiny:
        grid_b, grid_ctx = (1, 2), (256,)
    if not args.sweep_only:
        for ctx in grid_ctx:
            for bsz in grid_b:
                base_ms, base_bytes, base_name = bf16_decode(bsz, ctx)
                rows.append({"op": "decode", "B": bsz, "ctx": ctx, "format": "bf16", "ms": round(base_ms, 4),
                             "x_bf16": 1.0, "packed_GBps": round(base_bytes / base_ms / 1e6, 1),
                             "sdpa_layout": base_name})
                for name, fmt in FORMATS.items():
                    if name not in args.formats.split(","):
                        continue
                    prior = torch.randn(H, D) * 0.3
                    lay = PageLayout(fmt, prior, prior)
                    pages, staging, meta, nbytes = decode_inputs(lay, bsz, ctx)
                    cfg = cfg_for(bsz)
                    from kvarn.ops.decode import triton as tri

                    splits = tri.layout_splits(lay, bsz, meta["block_table"].shape[1], torch.device(DEV))
                    if bsz in best and name == "k4v2" and best[bsz].get("splits"):
                        splits = best[bsz]["splits"]
                    n_groups = len(lay.kernel_tables(torch.device(DEV)).groups)
                    outs = []
                    for streams in ((False, True) if args.streams and n_groups > 1 else (None,)):
                        label = name + ("+streams" if streams else "")
                        try:
                            torch.manual_seed(1)  # the same query for both: their outputs must agree
                            fn = kvarn_decode_fn(lay, pages, staging, meta, bsz, splits=splits, streams=streams, **cfg)
                            ms = bench(fn)
                            outs.append(fn().float().clone())
                            if len(outs) == 2 and not torch.allclose(outs[0], outs[1], atol=1e-3, rtol=1e-3):
                                print(f"  {label}: output differs from one stream's by "
                                      f"{(outs[0] - outs[1]).abs().max().item():.3e}", flush=True)
                        except Exception as e:  # noqa: BLE001
                            print(f"  {label} B={bsz} ctx={ctx} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                            continue
                        rows.append({"op": "decode", "B": bsz, "ctx": ctx, "format": label, "ms": round(ms, 4),
                                     "x_bf16": round(base_ms / ms, 3), "packed_GBps": round(nbytes / ms / 1e6, 1),
                                     "bits_per_element": round(bits_per_element([fmt]), 3), "head_groups": n_groups,
                                     "config": dict(cfg, splits=splits, streams=streams)})
                    del pages, staging, meta
                    torch.cuda.empty_cache()
                (out_dir / "kernels_h200.json").write_text(json.dumps(rows, indent=1))  # partial results survive
                print(f"ctx={ctx} B={bsz}: " + "  ".join(f"{r['format']} {r['ms']:.3f} ms x{r['x_bf16']:.2f}"
                                                         for r in rows if r["op"] == "decode" and r["B"] == bsz
                                                         and r["ctx"] == ctx), flush=True)
        # store: the worst decode step completes one tile per sequence (B tiles in one launch)
        for name, fmt in (FORMATS.items() if not args.no_store else ()):
            prior = torch.randn(H, D) * 0.3
            lay = PageLayout(fmt, prior, prior)
            for n, warps in (((1, 8), (1, 16), (1, 32), (64, 8), (64, 16), (64, 32)) if not args.tiny else ((1, 4),)):
                try:
                    ms = bench(store_fn(lay, n, warps))
                except Exception as e:  # noqa: BLE001
                    print(f"  store {name} n={n} warps={warps} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                dec = [r for r in rows if r["op"] == "decode" and r["format"] == name and r["B"] == 64
                       and r["ctx"] == 8192]
                share = ms / dec[0]["ms"] if dec else None
                rows.append({"op": "store", "B": n, "ctx": None, "format": name, "ms": round(ms, 4),
                             "num_warps": warps, "us_per_tile": round(1000 * ms / n, 2),
                             "share_of_decode_B64_8k": None if share is None else round(share, 3)})
                print(f"store {name}: {n} tiles, {warps} warps: {1000 * ms:.1f} us ({1000 * ms / n:.2f} us/tile)",
                      flush=True)

    (out_dir / "kernels_h200.json").write_text(json.dumps(rows, indent=1))
    print("\n| op | B | ctx | format | ms | x bf16 | packed GB/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if r["op"] in ("decode", "store"):
            print(f"| {r['op']} | {r['B']} | {r['ctx']} | {r['format']} | {r['ms']:.3f} | {r.get('x_bf16', '')} | "
                  f"{r.get('packed_GBps', '')} |")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
