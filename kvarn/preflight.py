"""Checks that run before the work: everything that can be known from the flags and the model's
config is checked before any weights load or calibration starts (each failure one ``KvarnError``
line naming the flag that was used).

* the memory target (``--avg-bits`` or ``--compression``): a finite number in range, and reachable
  by the format (the smallest layout it can store, scales included);
* the window length (``--seq-len``): within the model's context (``max_position_embeddings``),
  and its peak memory (estimated from the config) within the memory this machine has available;
* the attention (``check_attention``): a head_dim kvarn's rotation supports (64, 80, 96, 128,
  256) and, where the config has one, a positive finite attention-logit soft-cap (Gemma-2).

The memory estimate (``window_bytes``) was fitted to kvarn calibrate on SmolLM2-135M (float32, one
window; peak RSS above the loaded model at 512/1024/2048 tokens: 1.48/2.44/4.46 GiB, i.e. ≈0.55 GiB
+ 1.8 MiB/token + 71 bytes/token²) and written in terms of the config so it carries to other
models: per token, float32 logits with their log-softmax and gradient (3·vocab) and the activations a
backward pass keeps (≈16·hidden + 3·intermediate per layer); per token², one layer's attention
scores over [quantized; exact] keys (query heads × 2T, float32). It over-estimates SmolLM2's
measured peaks by 5-15% (calibrate; eval: see ``window_bytes``), on purpose: it refuses windows that
would swap, not ones that fit.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import KvarnError

_FIXED_BYTES = 0.55 * 2**30  # tokenized text, autograd bookkeeping, allocator slack (measured)
GIB = 2**30


def check_attention(config, name: str, head_dim: int, rotates: bool = True) -> None:
    """What kvarn needs of the model's attention, from its config alone (before any weights load).

    ``rotates``: whether anything asked for rotates (Hadamard) K/V, which needs a supported
    head_dim; sliding-window layers and soft-capping (``attn_logit_softcapping``) are supported.
    """
    from .quant.hadamard import check_head_dim

    if rotates:
        check_head_dim(head_dim, f"{name}: head_dim")
    cap = getattr(_text_config(config), "attn_logit_softcapping", None)
    if cap is not None and not (isinstance(cap, (int, float)) and not isinstance(cap, bool) and math.isfinite(cap)
                                and cap >= 0):
        raise KvarnError(f"{name}: attn_logit_softcapping={cap!r} in its config is not a number >= 0; "
                         "fix the config (null or 0 turns soft-capping off)")


def budget_bits(avg_bits: float | None, compression: float | None, default: float) -> tuple[float, str]:
    """``(bits per element, the flag it came from)``; a one-line error naming that flag when it is
    not a finite number in range."""
    if avg_bits is not None and compression is not None:
        raise KvarnError("--avg-bits and --compression both given; pass one memory target")
    if compression is not None:
        if not (isinstance(compression, (int, float)) and math.isfinite(compression) and 1 < compression < 16):
            raise KvarnError(f"--compression {compression:g}: must be a number in (1, 16) — how many times fewer "
                             "bytes than fp16 (e.g. --compression 5)")
        return 16.0 / compression, "--compression"
    if avg_bits is None:
        return default, "--avg-bits"
    if not (isinstance(avg_bits, (int, float)) and math.isfinite(avg_bits) and 1 < avg_bits <= 16):
        raise KvarnError(f"--avg-bits {avg_bits:g}: must be a number in (1, 16] — stored bits per K/V element, "
                         "scales included (e.g. --avg-bits 3)")
    return float(avg_bits), "--avg-bits"


def min_bits_per_element(k_format, v_format, tile: int, head_dim: int, candidate_bits) -> float:
    """Bits per element of the smallest layout: every head at the narrowest candidate width."""
    from .quant.formats import head_tile_bytes

    b = min(candidate_bits)
    per_token = (head_tile_bytes(k_format, b, tile, head_dim) + head_tile_bytes(v_format, b, tile, head_dim)) / tile
    return 8.0 * per_token / (2 * head_dim)


def check_reachable(avg_bits: float, flag: str, min_bits: float, detail: str) -> None:
    """The budget must allow at least the smallest layout (``min_bits`` bits/element)."""
    if avg_bits + 1e-9 >= min_bits:
        return
    if flag == "--compression":
        raise KvarnError(f"--compression {16 / avg_bits:g} asks for {avg_bits:.3f} bits/element, below the smallest "
                         f"layout this format stores ({min_bits:.3f} bits/element = {16 / min_bits:.2f}x: {detail}); "
                         f"use --compression {math.floor(16 / min_bits * 100) / 100:g} or less")
    raise KvarnError(f"--avg-bits {avg_bits:g} is below the smallest layout this format stores ({min_bits:.3f} "
                     f"bits/element: {detail}); use --avg-bits {math.ceil(min_bits * 1000) / 1000:g} or more")


def check_key_floor(min_k_bits, candidate_bits, avg_bits: float, flag: str, k_format, v_format, tile: int,
                    head_dim: int) -> None:
    """``--min-k-bits``: one of the candidate widths, and a budget that holds every key at that width
    with every value at the narrowest (the smallest layout the floor allows); else one line naming
    the flag, the bits the floor needs, and the fix."""
    if min_k_bits is None:
        return
    cands = sorted(candidate_bits)
    if isinstance(min_k_bits, bool) or min_k_bits not in cands:
        raise KvarnError(f"--min-k-bits {min_k_bits!r}: must be one of the candidate widths {cands}; "
                         f"e.g. --min-k-bits {cands[min(1, len(cands) - 1)]}")
    from .quant.formats import head_tile_bytes

    def layout_bits(kb: int) -> float:  # keys at kb bits, values at the narrowest width
        per_token = (head_tile_bytes(k_format, kb, tile, head_dim) + head_tile_bytes(v_format, cands[0], tile, head_dim)) / tile
        return 8.0 * per_token / (2 * head_dim)

    need = layout_bits(min_k_bits)
    if avg_bits + 1e-9 >= need:
        return
    lower = [b for b in cands if b < min_k_bits and layout_bits(b) <= avg_bits + 1e-9]
    if flag == "--compression":
        budget, more = f"--compression {16 / avg_bits:g}", f"--compression {math.floor(16 / need * 100) / 100:g} or less"
    else:
        budget, more = f"--avg-bits {avg_bits:g}", f"--avg-bits {math.ceil(need * 1000) / 1000:g} or more"
    raise KvarnError(f"--min-k-bits {min_k_bits}: keys at {min_k_bits} bits with values at {cands[0]} need "
                     f"{need:.3f} bits/element (scales included, head_dim {head_dim}, tile {tile}), more than "
                     f"{budget} allows; use {more}" + (f", or --min-k-bits {lower[-1]}" if lower else ""))


def check_reads_quantized(seq_len: int, schemes: list[tuple[str, int, bool]]) -> None:
    """Each ``(name, tile, keep_first_tile)`` method must read a quantized tile within a window of
    ``seq_len`` tokens: a query reads its own tile (and the first, where kept) in fp16, so a window
    of at most 2 tiles (1 without the fp16 first tile) reads nothing quantized and reports the
    method as lossless. One line naming every method that would."""
    short = [(name, tile, keep) for name, tile, keep in schemes if seq_len <= tile * (2 if keep else 1)]
    if not short:
        return
    need = max(tile * (2 if keep else 1) for _, tile, keep in short)
    what = ", ".join(f"{name} (tile {tile}{', first tile fp16' if keep else ''})" for name, tile, keep in short)
    raise KvarnError(f"--seq-len {seq_len}: too short for {what}: no query would read a quantized tile (a window "
                     f"must be longer than {need} tokens), so they would look lossless; "
                     f"use --seq-len {max(4 * t for _, t, _ in short)} or more")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_length(config) -> int | None:
    c = _text_config(config)
    n = getattr(c, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def weight_bytes(config, bytes_per_param: int = 4) -> int:
    """Parameters of a decoder-only transformer from its config (embeddings, attention, MLP)."""
    c = _text_config(config)
    h, L, V = c.hidden_size, c.num_hidden_layers, c.vocab_size
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    d = getattr(c, "head_dim", None) or h // heads
    inter = getattr(c, "intermediate_size", None) or 4 * h
    per_layer = h * heads * d * 2 + h * kv * d * 2 + 3 * h * inter
    embed = V * h * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    return bytes_per_param * (L * per_layer + embed)


def window_bytes(config, seq_len: int, backward: bool) -> int:
    """Estimated peak bytes of one window of ``seq_len`` tokens above the loaded model (see the
    module docstring). ``backward=False`` (eval): the fp16 pass's and the method's logits with
    their log-softmax and KL terms (5·vocab per token), no saved activations, the reference
    reader's probabilities and masks (about 3 score-sized tensors); measured on SmolLM2 (eval of
    one window, recipe + one preset): 1.56 GiB at 1024 tokens, 2.63 at 2048, estimated 1.64 / 2.95."""
    c = _text_config(config)
    h, L, V = c.hidden_size, c.num_hidden_layers, c.vocab_size
    inter = getattr(c, "intermediate_size", None) or 4 * h
    heads = c.num_attention_heads
    if backward:
        per_token = 4 * (3 * V + L * (16 * h + 3 * inter))
        per_token2 = 4 * heads * 2
    else:
        per_token = 4 * (5 * V + 16 * h + 3 * inter)
        per_token2 = 4 * heads * 3
    return int(_FIXED_BYTES + per_token * seq_len + per_token2 * seq_len * seq_len)


def available_memory() -> int | None:
    """Bytes this process can still take: MemAvailable, or the cgroup's limit minus its use when
    smaller (containers); None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


def _device_free(device) -> int | None:
    try:
        import torch

        return int(torch.cuda.mem_get_info(device)[0]) if str(device).startswith("cuda") else None
    except (RuntimeError, AssertionError, ValueError):
        return None


def check_window(config, seq_len: int, where: str, *, backward: bool, weights_loaded: bool,
                 available: int | None = None, device=None, bytes_per_param: int = 4) -> None:
    """``seq_len`` within the model's context and its estimated peak memory within what is
    available (plus the weights at ``bytes_per_param``, when they are not loaded yet): host memory,
    or the GPU's free memory when ``device`` is a CUDA device. ``where`` names the flag or spec."""
    ctx = context_length(config)
    if ctx is not None and seq_len > ctx:
        raise KvarnError(f"{where}: a window of {seq_len} tokens is longer than the model's context "
                         f"({ctx} tokens, max_position_embeddings); use --seq-len {ctx} or less")
    if available is None:
        available = available_memory() if device is None or str(device).startswith("cpu") else _device_free(device)
    if available is None:
        return
    extra = 0 if weights_loaded else weight_bytes(config, bytes_per_param)
    need = window_bytes(config, seq_len, backward) + extra
    if need <= available:
        return
    lo, hi = 1, seq_len  # the longest window that fits (window_bytes grows with seq_len)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if window_bytes(config, mid, backward) + extra <= available:
            lo = mid
        else:
            hi = mid - 1
    fit = f"use --seq-len {lo} or less" if window_bytes(config, lo, backward) + extra <= available else (
        "free some memory (not even a short window fits)")
    raise KvarnError(f"{where}: one window of {seq_len} tokens needs about {need / GIB:.1f} GiB "
                     f"({'weights, ' if extra else ''}activations and logits, estimated from the model's config), "
                     f"more than the {available / GIB:.1f} GiB this machine has available; {fit}")
