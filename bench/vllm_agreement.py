"""kvarn in vLLM against vLLM's own full-precision cache, on real prompts: greedy agreement,
capacity and wall time of one batch.

    python bench/vllm_agreement.py [--model DIR] [--recipe R] [--num-prompts 16] [--prompt-len 1000]
                                   [--max-tokens 32] [--dtype auto] [--out bench/results/vllm_agreement.json]

Defaults: the embedded SmolLM2 (converted once into its HF folder) and its shipped recipe
(``recipes/smollm2-135m-instruct.safetensors``); prompts are windows of the held-out half of the
Wikipedia sample (``wiki:second``), so they fill several 128-token tiles before generation starts.

Reported per engine: KV capacity (tokens vLLM can hold in the same explicit KV budget), the
median wall time of generating the batch (after one warm-up batch), and for kvarn how many of the
first ``--max-tokens`` greedy tokens equal the baseline's. Both engines run in this process, one
after the other, with the same settings apart from ``kv_cache_dtype``. Timings of the kvarn engine
measure its PyTorch reader (no fused kernels yet): a baseline for the GPU kernels, not a result.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "recipes" / "smollm2-135m-instruct.safetensors"


def real_prompts(model_dir: str, n: int, length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from kvarn.data import load_text

    text, _ = load_text("wiki:second")
    ids = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
    step = (len(ids) - length) // n
    if step < length:
        raise SystemExit(f"wiki:second has {len(ids)} tokens: too few for {n} prompts of {length}")
    return [ids[i * step: i * step + length] for i in range(n)]


def run_engine(model_dir, prompts, args, **kw):
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model_dir, dtype=args.dtype, max_model_len=args.prompt_len + args.max_tokens + 128,
              max_num_seqs=args.num_prompts, kv_cache_memory_bytes=args.kv_bytes, gpu_memory_utilization=0.3,
              enforce_eager=True, enable_prefix_caching=False, seed=0, **kw)
    cc = llm.llm_engine.vllm_config.cache_config
    capacity = cc.num_gpu_blocks * cc.block_size
    model_dtype = llm.llm_engine.vllm_config.model_config.dtype
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    times, outs = [], None
    for i in range(args.repeats + 1):  # the first batch is warm-up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(batch, sp, use_tqdm=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"capacity_tokens": capacity, "block_size": cc.block_size, "model_dtype": str(model_dtype),
            "element_bytes": model_dtype.itemsize, "seconds": times,
            "median_s": statistics.median(times), "tokens": tokens}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: the embedded SmolLM2)")
    ap.add_argument("--recipe", default=str(SHIPPED), help="recipe file or preset (kvarn-k4v2-g128)")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-bytes", type=int, default=2 << 30, help="explicit KV-cache budget (bytes) for both engines")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare", nargs="*", default=[], metavar="DTYPE",
                    help="other --kv-cache-dtype values to measure the same way (e.g. fp8): context for the agreement")
    ap.add_argument("--out", default="bench/results/vllm_agreement.json")
    args = ap.parse_args()

    import torch
    import vllm

    from kvarn.recipe import Recipe

    if args.model is None:
        from kvarn.models import embedded_gguf_path, gguf_cache_path, load_model

        load_model()  # converts the embedded GGUF once
        args.model = str(gguf_cache_path(embedded_gguf_path()))
    prompts = real_prompts(args.model, args.num_prompts, args.prompt_len)
    engines = {"kvarn " + Path(args.recipe).name: run_engine(
        args.model, prompts, args, kv_cache_dtype="kvarn", additional_config={"kvarn_recipe": args.recipe})}
    for dtype in args.compare:
        engines[dtype] = run_engine(args.model, prompts, args, kv_cache_dtype=dtype)
    base = run_engine(args.model, prompts, args)
    # capacity per fp16 element: a float32 baseline cache holds half the tokens an fp16 one would
    fp16_tokens = base["capacity_tokens"] * base["element_bytes"] / 2
    predicted = Recipe.load(args.recipe).compression() if Path(args.recipe).is_file() else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    rows = []
    for name, eng in engines.items():
        same = [sum(a == b for a, b in zip(x, y)) for x, y in zip(eng["tokens"], base["tokens"])]
        first = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), args.max_tokens)
                 for x, y in zip(eng["tokens"], base["tokens"])]
        rows.append({"cache": name, **{k: v for k, v in eng.items() if k != "tokens"},
                     "capacity_vs_fp16": eng["capacity_tokens"] / fp16_tokens, "time_ratio": eng["median_s"] / base["median_s"],
                     "greedy_equal_fraction": sum(same) / (args.max_tokens * len(same)),
                     "all_equal_prompts": sum(f == args.max_tokens for f in first), "first_difference": first,
                     "first_difference_median": statistics.median(first)})
    res = {
        "device": device, "vllm": vllm.__version__, "torch": torch.__version__, "model": args.model,
        "recipe": args.recipe, "dtype": args.dtype, "num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "kv_bytes": args.kv_bytes, "predicted_compression": predicted,
        "baseline": {k: v for k, v in base.items() if k != "tokens"}, "caches": rows,
    }
    print(f"\n{device}, vLLM {vllm.__version__}, {args.num_prompts} prompts x {args.prompt_len} tokens (wiki:second), "
          f"greedy {args.max_tokens}, model dtype {base['model_dtype']}")
    print(f"{'cache':<40} {'capacity tok':>13} {'x fp16':>7} {'batch s':>8} {'x base':>7} {'greedy =':>9} "
          f"{'all-32 =':>9} {'1st diff':>9}")
    print(f"{'baseline (' + base['model_dtype'] + ')':<40} {base['capacity_tokens']:>13} "
          f"{base['capacity_tokens'] / fp16_tokens:>7.2f} {base['median_s']:>8.2f} {1:>7.2f} {1:>9.3f} "
          f"{args.num_prompts:>9} {args.max_tokens:>9}")
    for r in rows:
        print(f"{r['cache']:<40} {r['capacity_tokens']:>13} {r['capacity_vs_fp16']:>7.2f} {r['median_s']:>8.2f} "
              f"{r['time_ratio']:>7.2f} {r['greedy_equal_fraction']:>9.3f} {r['all_equal_prompts']:>9} "
              f"{r['first_difference_median']:>9}")
    print("greedy =: share of generated tokens equal to the baseline's at the same position; all-32 =: prompts whose "
          "tokens all equal; 1st diff: median index of the first different token")
    if predicted:
        print(f"recipe predicts {predicted:.2f}x fewer bytes than fp16 per cached token")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
