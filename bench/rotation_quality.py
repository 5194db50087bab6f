"""Which rotation for head_dim 80/96: a full Hadamard (Paley II ⊗ Sylvester) or a block-diagonal one?

Real keys (post-RoPE) and values of SmolLM2-135M (head_dim 64) on the Wikipedia sample, stored with
kvarn's formats (K: per-channel RTN over a 128-token tile; V: static per-channel scale + per-token
RTN; both with the clip search), under several rotations R (``x → x R``, read back as ``x̂ Rᵀ``):

* D=64 (real heads): no rotation, the full Sylvester H64, block-diagonal 32+32 and 4x16 — how much
  does mixing beyond a block cost?
* D=80 / D=96 (pseudo-heads: a head's 64 channels plus 16 / 32 channels of the next KV head of the
  same layer, whole RoPE pairs; queries built the same way): no rotation, the full H80 / H96,
  block-diagonal 64+16 / 64+32, and a random orthogonal matrix (the "perfect mixing" reference).

Reported per width: relative error of the stored K and V (‖x̂ − x‖² / ‖x‖²) and of the attention
output when K (resp. V) alone is quantized, causal attention over the whole window, mean over
layers and heads. Run: ``python bench/rotation_quality.py [--windows 2 --seq-len 1024]``.
"""

from __future__ import annotations

import argparse
import math

import torch

from kvarn.quant.hadamard import hadamard_matrix
from kvarn.quant.rtn import fake_quantize_rtn

TILE = 128


def block_diag(*sizes):
    return torch.block_diag(*[hadamard_matrix(s, torch.float32) for s in sizes])


def random_orthogonal(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def quant_k(k, r, bits):
    """k [H, T, D] → per-channel RTN over tiles of TILE tokens, in the basis r."""
    h, t, d = k.shape
    x = (k @ r).reshape(h, t // TILE, TILE, d)
    return fake_quantize_rtn(x, bits, dim=-2, clip=True).reshape(h, t, d) @ r.T


def quant_v(v, r, bits):
    x = v @ r
    scale = x.std(dim=1, keepdim=True).clamp_min(1e-6)  # the static prior: per channel, over the data
    return (fake_quantize_rtn(x / scale, bits, dim=-1, clip=True) * scale) @ r.T


def attention(q, k, v):
    """q [Hq, T, D], k/v [H, T, D] causal."""
    g = q.shape[0] // k.shape[0]
    return torch.nn.functional.scaled_dot_product_attention(
        q[None], k.repeat_interleave(g, 0)[None], v.repeat_interleave(g, 0)[None], is_causal=True)[0]


def capture(windows, seq_len):
    from kvarn.data import load_text, make_windows
    from kvarn.model_hook import attached
    from kvarn.models import load_model
    from kvarn.quant.attention import mixed_attention

    lm = load_model()
    text, _ = load_text("wiki:first")
    ids = make_windows(lm.tokenizer, text, windows, seq_len, "wiki:first")
    store = []

    class Grab:
        def attend(self, layer_idx, q, k, v, bias, scaling, softcap=None):
            store.append((layer_idx, q[0].float().half().float(), k[0].float().half().float(),
                          v[0].float().half().float()))
            return mixed_attention(q, k, v, None, None, None, bias, scaling)

    with torch.no_grad(), attached(lm.model, Grab()):
        for i in range(windows):
            lm.model(ids[i:i + 1])
    return store


def pseudo_heads(q, k, v, extra):
    """Heads of 64 + ``extra`` channels: head h's and ``extra`` channels (whole RoPE pairs) of h+1."""
    h, hq = k.shape[0], q.shape[0]
    g = hq // h
    half = extra // 2
    idx = torch.cat([torch.arange(half), 32 + torch.arange(half)])  # channel i and its RoPE pair i+32
    nxt = (torch.arange(h) + 1) % h
    k2 = torch.cat([k, k[nxt][..., idx]], -1)
    v2 = torch.cat([v, v[nxt][..., idx]], -1)
    qn = q.reshape(h, g, *q.shape[1:])[nxt].reshape(q.shape)
    q2 = torch.cat([q, qn[..., idx]], -1)
    return q2, k2, v2


def rel(a, b):
    return float(((a - b) ** 2).sum() / (b**2).sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    a = ap.parse_args()
    torch.set_num_threads(2)
    store = capture(a.windows, a.seq_len)
    setups = {
        64: {"none": torch.eye(64), "full H64": hadamard_matrix(64), "block 32+32": block_diag(32, 32),
             "block 4x16": block_diag(16, 16, 16, 16)},
        80: {"none": torch.eye(80), "full H80 (Paley)": hadamard_matrix(80), "block 64+16": block_diag(64, 16),
             "block 5x16": block_diag(*[16] * 5), "random orthogonal": random_orthogonal(80)},
        96: {"none": torch.eye(96), "full H96 (Paley)": hadamard_matrix(96), "block 64+32": block_diag(64, 32),
             "block 3x32": block_diag(32, 32, 32), "random orthogonal": random_orthogonal(96)},
    }
    print(f"SmolLM2-135M, {a.windows} x {a.seq_len} tokens of wiki:first, {len(store)} (window, layer) pairs, "
          f"tile {TILE}; relative squared errors x1e3 (mean over layers and heads)\n")
    for d, rots in setups.items():
        print(f"### D={d}" + (" (real heads)" if d == 64 else f" (pseudo-heads: 64 + {d - 64} channels)"))
        print("| rotation | bits | K stored | V stored | attn out (K q.) | attn out (V q.) |")
        print("|---|---|---|---|---|---|")
        for name, r in rots.items():
            for bits in a.bits:
                acc = [0.0, 0.0, 0.0, 0.0]
                for _, q, k, v in store:
                    if d > 64:
                        q, k, v = pseudo_heads(q, k, v, d - 64)
                    o = attention(q, k, v)
                    kh, vh = quant_k(k, r, bits), quant_v(v, r, bits)
                    acc[0] += rel(kh, k)
                    acc[1] += rel(vh, v)
                    acc[2] += rel(attention(q, kh, v), o)
                    acc[3] += rel(attention(q, k, vh), o)
                n = len(store)
                print(f"| {name} | {bits} | " + " | ".join(f"{1e3 * x / n:.2f}" for x in acc) + " |")
        print()


if __name__ == "__main__":
    main()
