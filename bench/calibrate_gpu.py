"""Calibration on a CUDA GPU at a real model's shape: wall time and peak GPU memory of the capture
(forward + backward + candidate passes per layer), statistics and allocation that ``kvarn
calibrate`` runs, for the Llama-3.1-8B shape with random bf16 weights.

    python bench/calibrate_gpu.py [--windows 128] [--seq-len 2048] [--avg-bits 3.0] [--out DIR]

Random weights and random token ids (no tokenizer or weights travel): the time and memory of
calibration depend on the shape, not on the values. The stages are the ones ``kvarn.api.calibrate``
runs after tokenizing (``capture_kv`` → ``compute_stats`` → ``allocate_bits``), with the default
formats (K per channel without normalization, V per token with the static scale, clipping on).
Writes ``DIR/calibrate_gpu.json`` (seconds per stage, windows/s, peak GPU memory) and prints it.
``--tiny`` is a CPU dry run of this script (a 2-layer model, 2 windows).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_gpu import LLAMA_8B  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--avg-bits", type=float, default=3.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from kvarn.allocation import allocate_bits
    from kvarn.capture import CaptureConfig, capture_kv
    from kvarn.quant.formats import TensorFormat
    from kvarn.stats import compute_stats

    cfg = dict(LLAMA_8B)
    dev, dtype = ("cuda", torch.bfloat16) if not args.tiny else ("cpu", torch.float32)
    if args.tiny:
        cfg.update(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, vocab_size=1024, bos_token_id=1, eos_token_id=2)
        args.windows, args.seq_len = 2, 384
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")})
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter() - t0
    windows = torch.randint(0, config.vocab_size, (args.windows, args.seq_len), generator=torch.Generator().manual_seed(1))
    k_fmt = TensorFormat((), "channel", "none", clip=True)
    v_fmt = TensorFormat((), "token", "static", clip=True)
    cc = CaptureConfig(tile=128, keep_first_tile=True, k=k_fmt, v=v_fmt)
    t = time.perf_counter()
    cap = capture_kv(model, windows, cc, progress=True)
    if dev == "cuda":
        torch.cuda.synchronize()
    t_capture = time.perf_counter() - t
    t = time.perf_counter()
    stats = compute_stats(cap, "fisher")
    hd = config.head_dim
    alloc = allocate_bits(stats.k_err, stats.v_err, stats.candidate_bits, k_fmt, v_fmt, 128, hd, args.avg_bits)
    t_alloc = time.perf_counter() - t
    res = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
        "model": "Llama-3.1-8B shape, random weights" if not args.tiny else "tiny Llama (dry run)",
        "dtype": str(dtype), "windows": args.windows, "seq_len": args.seq_len,
        "build_s": round(t_build, 1), "capture_s": round(t_capture, 1), "stats_alloc_s": round(t_alloc, 2),
        "calibrate_s": round(t_capture + t_alloc, 1), "windows_per_s": round(args.windows / t_capture, 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None,
        "bits_per_element": round(alloc.bits_per_element, 3),
        "k_bits_mean": round(float(alloc.k_bits.float().mean()), 3),
        "v_bits_mean": round(float(alloc.v_bits.float().mean()), 3),
    }
    print(json.dumps(res, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibrate_gpu.json").write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
