"""vLLM's TurboQuant KV-cache formats (``--kv-cache-dtype turboquant_*``, vLLM 0.26.0), as baselines.

What vLLM 0.26 stores, per token and KV head (read from its source:
``model_executor/layers/quantization/turboquant/{config,centroids}.py``,
``v1/attention/ops/triton_turboquant_{store,decode}.py``, ``engine/arg_utils.py``):

* **keys, MSE presets** (3 or 4 bits): the norm ``n = ||k||`` (stored fp16), the unit vector
  ``k / (n + 1e-8)`` rotated by the orthonormal Sylvester-Hadamard matrix, and each rotated
  coordinate replaced by the nearest centroid of a Lloyd-Max quantizer for ``N(0, 1/D)`` (the law
  of one coordinate of a random unit vector). ``_nc`` presets ("norm correction") divide the
  centroid vector by its own norm before rotating back, so the key read is
  ``fp16(n) * H (c / ||c||)``. Codes: ``D·b/8`` bytes, plus 2 bytes of norm.
* **keys, k8v4**: a plain float8 e4m3 cast (no scale; Hopper's format): ``D`` bytes.
* **values**: per-token asymmetric min/max uniform quantization at 3 or 4 bits:
  ``scale = max((max - min) / (2^b - 1), 1e-8)``, ``code = floor((v - min) / scale + 1/2)``
  clamped, computed with the float32 scale; the scale and ``min`` are stored fp16 and the reader
  computes ``code * fp16(scale) + fp16(min)``. ``D·b/8 + 4`` bytes.
* **layers left unquantized**: for every ``turboquant_*`` dtype on a dense model, the first 2 and
  last 2 layers (``min(2, L // 2)`` each side) keep the model's own dtype (16 bits).
* the slot (key + value bytes) is rounded up to an even number of bytes (no padding at head_dim
  64/128/256, the only sizes kvarn supports).

Reading rule: every token is quantized when it is written, and a decode step reads the whole cache
in stored form, its own token included (vLLM's first prefill chunk attends to the raw K/V; the
eval reads the way decoding does, as for kvarn's per-token baselines).

Departures: the centroids are the exact Lloyd-Max fixed point (Gaussian conditional means in
closed form) where vLLM integrates numerically (trapezoid rule, 200 points per cell): the two agree
to ~1e-6 of sigma. Nothing here stores or packs codes; this is the fake-quantized view the eval
reads.
"""

from __future__ import annotations

import functools
import math

import torch

from .hadamard import rotate

PRESETS = {  # name: (key bits (8 = fp8 keys), value bits), all with norm correction for MSE keys
    "turboquant-k8v4": (8, 4),
    "turboquant-4bit-nc": (4, 4),
    "turboquant-k3v4-nc": (3, 4),
    "turboquant-3bit-nc": (3, 3),
}
BOUNDARY_LAYERS = 2  # first and last layers vLLM leaves in the model's dtype


def boundary_layers(num_layers: int, n: int = BOUNDARY_LAYERS) -> list[int]:
    """Layer indices vLLM 0.26 keeps unquantized for a dense model: the first and last ``n``."""
    n = min(n, num_layers // 2)
    return sorted(set(range(n)) | set(range(num_layers - n, num_layers)))


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) if math.isfinite(x) else 0.0


def _cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


@functools.lru_cache(maxsize=32)
def lloyd_max_centroids(head_dim: int, bits: int, iters: int = 500) -> tuple[float, ...]:
    """The ``2^bits`` Lloyd-Max centroids (sorted) for ``N(0, 1/head_dim)``.

    Fixed-point iteration of the two optimality conditions: boundaries at midpoints of adjacent
    centroids, each centroid the conditional mean of its cell, ``sigma (phi(a) - phi(b)) /
    (Phi(b) - Phi(a))`` in units of sigma; started from a uniform grid on ``[-3.5, 3.5]`` sigma.
    """
    n = 2**bits
    sigma = 1.0 / math.sqrt(head_dim)
    c = [-3.5 + 7.0 * (i + 0.5) / n for i in range(n)]
    for _ in range(iters):
        edges = [-math.inf] + [(c[i] + c[i + 1]) / 2 for i in range(n - 1)] + [math.inf]
        new = []
        for i in range(n):
            a, b = edges[i], edges[i + 1]
            mass = _cdf(b) - _cdf(a)
            new.append((_phi(a) - _phi(b)) / mass if mass > 1e-300 else c[i])
        done = max(abs(x - y) for x, y in zip(new, c)) < 1e-13
        c = new
        if done:
            break
    return tuple(sigma * x for x in c)


def fake_quantize_keys(x: torch.Tensor, bits: int) -> torch.Tensor:
    """TurboQuant MSE keys with norm correction: ``x [..., D]`` (one token per row) → float32 read.

    ``fp16(n) * rotate(c / ||c||)`` where ``n = ||x||``, ``c`` = nearest Lloyd-Max centroid of each
    coordinate of ``rotate(x / (n + 1e-8))`` (a coordinate on a midpoint goes to the upper one).
    """
    x = x.float()
    d = x.shape[-1]
    cents = torch.tensor(lloyd_max_centroids(d, bits), dtype=torch.float32, device=x.device)
    mids = (cents[:-1] + cents[1:]) / 2
    norm = x.norm(dim=-1, keepdim=True)
    y = rotate(x / (norm + 1e-8))
    c = cents[torch.bucketize(y, mids, right=True)]
    c = c / torch.sqrt((c * c).sum(-1, keepdim=True) + 1e-16)
    return rotate(c) * norm.half().float()


def fake_quantize_values(x: torch.Tensor, bits: int) -> torch.Tensor:
    """TurboQuant values: per-row (token) min/max uniform quantization, ``x [..., D]`` → float32 read."""
    x = x.float()
    levels = 2**bits - 1
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    codes = torch.floor((x - lo) / scale + 0.5).clamp_(0, levels)
    return codes * scale.half().float() + lo.half().float()
