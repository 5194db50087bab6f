"""Where a vLLM serving step goes, per cache: step times by phase and a torch profile of a few steps.

    python bench/profile_serve_gpu.py [--kv fp16,kvarn-k4v2] [--requests 64] [--prompt 8192] [--gen 128]

Same engine as ``bench/serve_gpu.py`` (Llama-3.1-8B shape, dummy weights, vLLM defaults). One burst
per cache; every engine step is timed on the host (the time between ``step()`` returns) and labelled
*mixed* (some request still prefilling) or *decode* (all prompts done). Three mixed steps and five
decode steps run under ``torch.profiler``; kvarn's runtime functions are wrapped in
``record_function`` ranges so their host and device time show as rows. Writes
``DIR/profile_<kv>.json`` (step-time summary) and ``DIR/profile_<kv>_{mixed,decode}.txt`` (op tables)
and prints the summary and the top rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_gpu import engine, mix_recipe, model_dir, run_burst  # noqa: E402

WRAPPED = {"kvarn.runtime.paged": ["_attend_decode", "_stage", "_read_raw", "decode_batch", "store_tiles", "decode",
                                   "varlen_attention"],
           "kvarn.runtime.vllm_backend": []}


def _label(mod, name: str) -> None:
    import torch

    fn = getattr(mod, name)

    @functools.wraps(fn)
    def wrapped(*a, **kw):
        with torch.profiler.record_function(f"kvarn.{name}"):
            return fn(*a, **kw)

    setattr(mod, name, wrapped)


def instrument() -> None:
    import importlib

    import torch

    for modname, names in WRAPPED.items():
        mod = importlib.import_module(modname)
        for n in names:
            _label(mod, n)
    vb = importlib.import_module("kvarn.runtime.vllm_backend")
    for cls, meth in ((vb.EngineCache, "plan"), (vb.KvarnImpl, "forward")):
        fn = getattr(cls, meth)

        def make(fn=fn, tag=f"kvarn.{cls.__name__}.{meth}"):
            @functools.wraps(fn)
            def wrapped(*a, **kw):
                with torch.profiler.record_function(tag):
                    return fn(*a, **kw)
            return wrapped

        setattr(cls, meth, make())


def _dev(e, name: str) -> float:
    """A profiler row's device time (torch renamed cuda_* to device_*)."""
    v = getattr(e, name, None)
    return v if v is not None else getattr(e, name.replace("device", "cuda"), 0.0)


def profile_burst(llm, n: int, plen: int, gen: int, out: Path, kv: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    g = torch.Generator().manual_seed(0)
    eng = llm.llm_engine
    sp = SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True)
    for i in range(n):
        ids = torch.randint(1000, 100000, (plen,), generator=g).tolist()
        eng.add_request(f"p{i}", TokensPrompt(prompt_token_ids=ids), sp)
    started: set[str] = set()
    steps = []  # (seconds, phase)
    prof = {"mixed": None, "decode": None}
    mixed_seen = decode_seen = 0
    active = None
    torch.cuda.synchronize()
    last = time.perf_counter()
    while eng.has_unfinished_requests():
        phase = "decode" if len(started) == n else "mixed"
        if phase == "mixed":
            mixed_seen += 1
        else:
            decode_seen += 1
        want = (phase == "mixed" and mixed_seen == 4) or (phase == "decode" and decode_seen == 11)
        if want and prof[phase] is None:
            active = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=phase == "mixed")
            active.start()
            prof[phase] = (active, 3 if phase == "mixed" else 5)
        outs = eng.step()
        now = time.perf_counter()
        steps.append((now - last, phase))
        last = now
        for o in outs:
            if o.outputs and len(o.outputs[0].token_ids) > 0:
                started.add(o.request_id)
        if active is not None:
            p, left = prof[phase]
            left -= 1
            prof[phase] = (p, left)
            if left == 0:
                torch.cuda.synchronize()
                p.stop()
                active = None
    summary = {"kv": kv, "requests": n, "prompt": plen, "generated": gen}
    for ph in ("mixed", "decode"):
        ts = [s for s, p in steps if p == ph]
        if ts:
            summary[ph] = {"steps": len(ts), "total_s": round(sum(ts), 3), "median_ms": round(1000 * statistics.median(ts), 2),
                           "p10_ms": round(1000 * sorted(ts)[len(ts) // 10], 2), "max_ms": round(1000 * max(ts), 2)}
        pr = prof.get(ph)
        if pr:
            ka = pr[0].key_averages()
            text = (f"# {kv} {ph}: by device time\n" + ka.table(sort_by="self_cuda_time_total", row_limit=40)
                    + f"\n# {kv} {ph}: by host time (total)\n" + ka.table(sort_by="cpu_time_total", row_limit=40))
            (out / f"profile_{kv}_{ph}.txt").write_text(text)
            kv_rows = [e for e in ka if e.key.startswith("kvarn.")]
            summary[ph + "_ranges"] = {e.key: {"count": e.count, "cpu_ms": round(e.cpu_time_total / 1000, 2),
                                               "device_ms": round(_dev(e, "device_time_total") / 1000, 2)}
                                       for e in kv_rows}
            top = sorted(ka, key=lambda e: -_dev(e, "self_device_time_total"))[:15]
            summary[ph + "_top_device"] = [(e.key[:80], e.count, round(_dev(e, "self_device_time_total") / 1000, 2))
                                           for e in top]
            syncs = [e for e in ka if e.key == "cudaStreamSynchronize"]
            summary[ph + "_syncs"] = sum(e.count for e in syncs)
            if ph == "mixed":  # where the host waits for the device
                by_stack = [e for e in pr[0].key_averages(group_by_stack_n=8) if e.key == "cudaStreamSynchronize"]
                summary["sync_stacks"] = [(e.count, e.stack[:8]) for e in by_stack]
    (out / f"profile_{kv}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", default="fp16,kvarn-k4v2")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kvs = [k for k in args.kv.split(",") if k]
    if len(kvs) > 1:
        rc = 0
        for kv in kvs:
            rc |= subprocess.run([sys.executable, __file__, "--kv", kv, "--requests", str(args.requests), "--prompt",
                                  str(args.prompt), "--gen", str(args.gen), "--out", str(out)]).returncode
        for kv in kvs:
            p = out / f"profile_{kv}.json"
            if p.exists():
                s = json.loads(p.read_text())
                print(kv, {k: s.get(k) for k in ("mixed", "decode", "mixed_syncs", "decode_syncs")})
                for n, stack in s.get("sync_stacks") or []:
                    print(f"  sync x{n}: {stack}")
                for ph in ("mixed", "decode"):
                    for name, r in (s.get(ph + "_ranges") or {}).items():
                        print(f"  {ph} {name}: {r}")
                    for row in (s.get(ph + "_top_device") or [])[:10]:
                        print(f"  {ph} top {row}")
        return rc
    kv = kvs[0]
    instrument()
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "kvarn-serve"
    mdir = model_dir(work)
    mix = mix_recipe(mdir) if kv == "kvarn-mix" else None
    t = time.perf_counter()
    llm = engine(mdir, kv, mix, args.prompt + args.gen + 128, args.requests, False)
    print(f"{kv}: engine up in {time.perf_counter() - t:.0f} s", flush=True)
    run_burst(llm, 2, 1024, 8)
    s = profile_burst(llm, args.requests, args.prompt, args.gen, out, kv)
    print(kv, {k: s.get(k) for k in ("mixed", "decode")}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
