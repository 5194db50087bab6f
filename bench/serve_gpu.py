"""Serving benchmark on a CUDA GPU with vLLM: KV capacity and throughput of bursts per cache.

    python bench/serve_gpu.py [--bursts A,B,C] [--kv fp16,kvarn-k4v2,...] [--out DIR] [--eager]

Model: the Llama-3.1-8B shape (32 layers, 32 query / 8 KV heads, head_dim 128) with dummy weights
(``load_format="dummy"``; only a config.json is written, no weights travel), bf16, token-id prompts
(``skip_tokenizer_init``), greedy with ``ignore_eos``, vLLM defaults otherwise
(``gpu_memory_utilization`` 0.9). Bursts (all requests arrive at once):

* A: 64 x 8192 prompt + 512 generated (fits an fp16 cache)
* B: 160 x 8192 + 256 (capacity-bound for fp16)
* C: 64 x 16384 + 2048 (decode-heavy)

Caches (``--kv``): ``fp16`` (vLLM's own, the baseline), ``fp8``, ``int4_per_token_head``,
``turboquant_k3v4_nc`` (vLLM's), ``kvarn-k4v2`` (the uniform preset) and ``kvarn-mix`` (a recipe
whose K/V widths mix 2/3/4 bits per layer and head like a calibrated one, ~3.3 bits/element,
K without normalization, V with a static scale: made here for this shape, random widths of a fixed
seed); ``+graphs`` after a kvarn name runs it with decode rows from CUDA graphs
(``KVARN_DECODE_GRAPHS=1``). Each cache is one engine, started and measured in this process one after the other; every
ratio is against the fp16 engine of the same run (the same lease).

Per burst and cache: capacity (tokens of KV vLLM holds), total tokens/s (prompt + generated over
the burst's wall time), time per output token (per request: (last − first token time) /
(tokens − 1); median and p99 over requests) and time to first token (median), from a step loop
over ``llm_engine`` that stamps each request's tokens as they appear. Writes
``DIR/serve_h200.json`` (rows ``{"burst", "kv", "capacity_tokens", "capacity_x_fp16", "tok_s",
"x_fp16", "tpot_ms_p50", "tpot_ms_p99", "ttft_s_p50", ...}``) after every engine, and prints a
table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": 128001, "attention_bias": False, "mlp_bias": False,
}
BURSTS = {"A": (64, 8192, 512), "B": (160, 8192, 256), "C": (64, 16384, 2048)}
VLLM_KV = {"fp16": "auto", "fp8": "fp8", "int4_per_token_head": "int4_per_token_head",
           "turboquant_k3v4_nc": "turboquant_k3v4_nc"}


def model_dir(root: Path) -> Path:
    d = root / "llama-3.1-8b-shape"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(LLAMA_8B, indent=1))
    return d


def mix_recipe(mdir: Path, seed: int = 0) -> Path:
    """A recipe for the model's shape whose widths mix 2/3/4 bits like a calibrated one."""
    import torch
    from transformers import AutoConfig

    from kvarn.capture import CANDIDATE_BITS
    from kvarn.quant.formats import TensorFormat
    from kvarn.recipe import ModelFingerprint, Recipe

    cfg = AutoConfig.from_pretrained(mdir)
    fp = ModelFingerprint.from_config(cfg)
    L, H, D = fp.num_layers, fp.num_kv_heads, fp.head_dim
    gen = torch.Generator().manual_seed(seed)
    pick = lambda probs: torch.multinomial(torch.tensor(probs), L * H, replacement=True, generator=gen)  # noqa: E731
    widths = torch.tensor([2, 3, 4])
    k_bits = widths[pick([0.15, 0.35, 0.5])].reshape(L, H)
    v_bits = widths[pick([0.45, 0.35, 0.2])].reshape(L, H)
    k_fmt = TensorFormat((), "channel", "none", clip=True)
    v_fmt = TensorFormat((), "token", "static", clip=True)
    nb = len(CANDIDATE_BITS)
    r = Recipe(model_id=str(mdir), fingerprint=fp, tile=128, keep_first_tile=True, k_options=k_fmt.options(),
               v_options=v_fmt.options(), k_bits=k_bits, v_bits=v_bits, k_log_std=torch.zeros(L, H, D),
               v_log_std=torch.zeros(L, H, D), k_err=torch.zeros(L, H, nb), v_err=torch.zeros(L, H, nb),
               candidate_bits=tuple(CANDIDATE_BITS), calibration={"set": "synthetic mix (bench/serve_gpu.py)"},
               budget={}, created="", seed=seed)
    path = mdir.parent / "kvarn-mix.safetensors"
    r.save(path)
    print(f"kvarn-mix recipe: {r.bits_per_element():.3f} bits/element, {r.compression():.2f}x vs fp16", flush=True)
    return path


def engine(mdir: Path, kv: str, recipe_mix: Path | None, max_len: int, max_seqs: int, eager: bool):
    from vllm import LLM

    kw = dict(model=str(mdir), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, max_model_len=max_len,
              max_num_seqs=max_seqs, gpu_memory_utilization=0.9, enable_prefix_caching=False, seed=0,
              enforce_eager=eager)
    if kv.startswith("kvarn"):
        spec = "kvarn-k4v2-g128" if kv.split("+")[0] == "kvarn-k4v2" else str(recipe_mix)
        kw.update(kv_cache_dtype="kvarn", additional_config={"kvarn_recipe": spec}, block_size=128)
    else:
        kw.update(kv_cache_dtype=VLLM_KV[kv])
    return LLM(**kw)


def run_burst(llm, n: int, prompt_len: int, gen: int, seed: int = 0) -> dict:
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    g = torch.Generator().manual_seed(seed)
    eng = llm.llm_engine
    sp = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    stamps: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        ids = torch.randint(1000, 100000, (prompt_len,), generator=g).tolist()
        eng.add_request(f"r{i}", TokensPrompt(prompt_token_ids=ids), sp)
        stamps[f"r{i}"], counts[f"r{i}"] = [], 0
    running_max = 0
    while eng.has_unfinished_requests():
        outs = eng.step()
        now = time.perf_counter()
        for o in outs:
            c = len(o.outputs[0].token_ids)
            if c > counts[o.request_id]:
                stamps[o.request_id].extend([now] * (c - counts[o.request_id]))
                counts[o.request_id] = c
        try:
            running_max = max(running_max, len(eng.engine_core.engine_core.scheduler.running))
        except AttributeError:
            pass
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tpot = [(s[-1] - s[0]) / (len(s) - 1) for s in stamps.values() if len(s) > 1]
    ttft = [s[0] - t0 for s in stamps.values() if s]
    tpot.sort()
    return {"wall_s": wall, "tok_s": n * (prompt_len + gen) / wall, "gen_tok_s": n * gen / wall,
            "tpot_ms_p50": 1000 * statistics.median(tpot), "tpot_ms_p99": 1000 * tpot[min(len(tpot) - 1, int(0.99 * len(tpot)))],
            "ttft_s_p50": statistics.median(ttft), "max_running": running_max,
            "generated": sum(counts.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bursts", default="A,B,C")
    ap.add_argument("--kv", default="fp16,kvarn-k4v2,kvarn-mix,fp8")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--eager", action="store_true", help="enforce_eager for every engine (no torch.compile, no graphs)")
    ap.add_argument("--eager-kvarn", action="store_true", help="enforce_eager for the kvarn engines only")
    ap.add_argument("--scale", type=float, default=1.0, help="scale the bursts' request counts (smoke runs)")
    args = ap.parse_args()

    import torch
    import vllm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "kvarn-serve"
    mdir = model_dir(work)
    mix = mix_recipe(mdir) if any(k.split("+")[0] == "kvarn-mix" for k in args.kv.split(",")) else None
    bursts = [b for b in args.bursts.split(",") if b]
    max_len = max(BURSTS[b][1] + BURSTS[b][2] for b in bursts) + 128
    max_seqs = max(max(1, int(BURSTS[b][0] * args.scale)) for b in bursts)
    rows, errors = [], []
    meta = {"device": torch.cuda.get_device_name(), "vllm": vllm.__version__, "torch": torch.__version__,
            "model": "Llama-3.1-8B shape, dummy weights, bf16", "max_model_len": max_len, "max_num_seqs": max_seqs}
    kvs = [k for k in args.kv.split(",") if k]
    if len(kvs) > 1:  # one process per engine: an engine's GPU memory is not given back inside a process
        for kv in kvs:
            sub = out / f"engine-{kv}"
            cmd = [sys.executable, __file__, "--kv", kv, "--bursts", args.bursts, "--out", str(sub),
                   "--scale", str(args.scale)] + ["--eager"] * args.eager + ["--eager-kvarn"] * args.eager_kvarn
            graphs = {"KVARN_DECODE_GRAPHS": "1" if kv.endswith("+graphs") else "0"}
            rc = subprocess.run(cmd, env={**os.environ, **graphs}).returncode
            try:
                part = json.loads((sub / "serve_h200.json").read_text())
            except (OSError, ValueError) as e:
                errors.append({"kv": kv, "stage": "process", "error": f"exit {rc}, no results ({type(e).__name__})"})
                continue
            rows += part["rows"]
            errors += part["errors"]
            _write(out, meta, rows, errors)
        kvs = []
    for kv in kvs:
        t = time.perf_counter()
        try:
            llm = engine(mdir, kv, mix, max_len, max_seqs, args.eager or (args.eager_kvarn and kv.startswith("kvarn")))
        except Exception as e:  # noqa: BLE001 - report and measure the others
            errors.append({"kv": kv, "stage": "start", "error": f"{type(e).__name__}: {str(e)[:400]}"})
            print(f"{kv}: engine failed to start: {errors[-1]['error']}", flush=True)
            continue
        cc = llm.llm_engine.vllm_config.cache_config
        cap = cc.num_gpu_blocks * cc.block_size
        start_s = time.perf_counter() - t
        print(f"{kv}: engine up in {start_s:.0f} s, capacity {cap} tokens", flush=True)
        try:
            run_burst(llm, 2, 1024, 8)  # warm-up (kernel compiles, first allocations)
        except Exception as e:  # noqa: BLE001
            errors.append({"kv": kv, "stage": "warm-up", "error": f"{type(e).__name__}: {str(e)[:400]}"})
            print(f"{kv}: warm-up failed: {errors[-1]['error']}", flush=True)
        else:
            for b in bursts:
                n, plen, gen = BURSTS[b]
                n = max(1, int(n * args.scale))
                try:
                    res = run_burst(llm, n, plen, gen)
                except Exception as e:  # noqa: BLE001
                    errors.append({"kv": kv, "burst": b, "error": f"{type(e).__name__}: {str(e)[:400]}"})
                    print(f"{kv} burst {b}: failed: {errors[-1]['error']}", flush=True)
                    break
                rows.append({"burst": b, "kv": kv, "requests": n, "prompt": plen, "generated_per_request": gen,
                             "capacity_tokens": cap, "engine_start_s": round(start_s, 1),
                             "eager": bool(args.eager or (args.eager_kvarn and kv.startswith("kvarn"))),
                             **{k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}})
                print(f"{kv} burst {b}: {res['wall_s']:.1f} s, {res['tok_s']:.0f} tok/s, tpot p50 "
                      f"{res['tpot_ms_p50']:.1f} ms p99 {res['tpot_ms_p99']:.1f} ms, ttft p50 {res['ttft_s_p50']:.1f} s, "
                      f"at most {res['max_running']} running", flush=True)
                _write(out, meta, rows, errors)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    _write(out, meta, rows, errors)
    print("\n| burst | kv | capacity tokens | x fp16 | tok/s | x fp16 | TPOT p50 ms | TPOT p99 ms | TTFT p50 s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['burst']} | {r['kv']} | {r['capacity_tokens']} | {r.get('capacity_x_fp16')} | {r['tok_s']:.0f} | "
              f"{r.get('x_fp16')} | {r['tpot_ms_p50']:.1f} | {r['tpot_ms_p99']:.1f} | {r['ttft_s_p50']:.2f} |")
    return 0 if not errors else 1


def _write(out: Path, meta: dict, rows: list, errors: list) -> None:
    base = {r["burst"]: r for r in rows if r["kv"] == "fp16"}
    for r in rows:
        b = base.get(r["burst"])
        r["capacity_x_fp16"] = round(r["capacity_tokens"] / b["capacity_tokens"], 3) if b else None
        r["x_fp16"] = round(r["tok_s"] / b["tok_s"], 3) if b else None
    (out / "serve_h200.json").write_text(json.dumps({**meta, "rows": rows, "errors": errors}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
