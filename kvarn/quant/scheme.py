"""A whole-model cache scheme: per-layer formats + fp16 first tile + priors, and its reference reader.

``CacheScheme`` is what a recipe or a preset turns into; ``SchemeAttention`` is the handler (see
``kvarn.model_hook``) that evaluates a forward pass the way the runtime reads such a cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .attention import tiled_attention
from .codec import NORMALIZE_ITERS, fake_quantize_sequence
from .formats import FP16_BITS, LayerFormat, TensorFormat, bits_per_element, fp16_tokens_per_sequence
from .turboquant import PRESETS as TURBOQUANT_PRESETS
from .turboquant import boundary_layers


@dataclass
class CacheScheme:
    """How every layer's K/V cache is stored.

    k_log_std, v_log_std: optional ``[L, H, D]`` calibrated per-channel log-std after rotation
    (priors for the normalization; the fixed channel scale for ``normalize="static"``).
    """

    name: str
    layers: list[LayerFormat]
    keep_first_tile: bool = True
    k_log_std: torch.Tensor | None = None
    v_log_std: torch.Tensor | None = None
    iters: int = NORMALIZE_ITERS

    @property
    def tile(self) -> int:
        return self.layers[0].tile

    def bits_per_element(self) -> float:
        return bits_per_element(self.layers)

    def compression(self) -> float:
        return 16.0 / self.bits_per_element()

    def fp16_tokens_per_sequence(self) -> int:
        return fp16_tokens_per_sequence(self.tile, self.keep_first_tile)


def uniform_scheme(
    name: str, num_layers: int, num_kv_heads: int, head_dim: int, tile: int,
    k: TensorFormat, v: TensorFormat, keep_first_tile: bool,
) -> CacheScheme:
    """Every layer and head stored alike (``k.bits``/``v.bits`` given with one entry)."""
    kf = k.with_bits(k.bits * num_kv_heads if len(k.bits) == 1 else k.bits)
    vf = v.with_bits(v.bits * num_kv_heads if len(v.bits) == 1 else v.bits)
    layers = [LayerFormat(head_dim, tile, kf, vf) for _ in range(num_layers)]
    return CacheScheme(name, layers, keep_first_tile)


PRESETS = ("kvarn-k4v2-g128", "kvarn-k4v4-g128", "kvarn-k2v2-g128", "kvarn-k4v2-g128-nosink",
           "int4-per-token-head", "kivi-2", "fp8-e4m3", *TURBOQUANT_PRESETS)


def preset_scheme(name: str, num_layers: int, num_kv_heads: int, head_dim: int) -> CacheScheme:
    """Calibration-free schemes: KVarN's uniform presets (the seed) and the usual baselines.

    kvarn-kXvY-g128: Hadamard + per-tile variance normalization + min/max RTN, first tile fp16
    (``-nosink``: the first tile is quantized too).
    int4-per-token-head: per token and head symmetric int4 (fp16 absmax scale), quantized on write (vLLM's int4_per_token_head).
    kivi-2: KIVI, 2-bit keys per channel / values per token, group 128, fp16 residual 128, no
    rotation. fp8-e4m3: cast on write with unit scale (vLLM's fp8 cache default).
    turboquant-*: vLLM 0.26's TurboQuant dtypes (``kvarn.quant.turboquant``): quantized on write,
    Lloyd-Max keys with norm correction (or fp8 keys for k8v4), min/max values, and the first and
    last two layers left at 16 bits as vLLM leaves them.
    """
    n, h, d = num_layers, num_kv_heads, head_dim
    m = re.fullmatch(r"kvarn-k([2348])v([2348])-g128(-nosink)?", name)
    if m:
        kb, vb = int(m.group(1)), int(m.group(2))
        return uniform_scheme(name, n, h, d, 128, TensorFormat((kb,), "channel", "tile"),
                              TensorFormat((vb,), "token", "tile"), not name.endswith("-nosink"))
    if name == "int4-per-token-head":
        f = TensorFormat((4,), "token", "none", hadamard=False, codec="rtn-sym")
        return uniform_scheme(name, n, h, d, 1, f, f, False)
    if name == "kivi-2":
        return uniform_scheme(name, n, h, d, 128, TensorFormat((2,), "channel", "none", hadamard=False),
                              TensorFormat((2,), "token", "none", hadamard=False), False)
    if name == "fp8-e4m3":
        f = TensorFormat((8,), "token", "none", hadamard=False, codec="fp8")
        return uniform_scheme(name, n, h, d, 1, f, f, False)
    if name in TURBOQUANT_PRESETS:
        kb, vb = TURBOQUANT_PRESETS[name]
        kf = (TensorFormat((8,) * h, "token", "none", hadamard=False, codec="fp8") if kb == 8 else
              TensorFormat((kb,) * h, "token", "none", hadamard=True, codec="lloyd-max"))
        vf = TensorFormat((vb,) * h, "token", "none", hadamard=False, codec="rtn-tq")
        skip = set(boundary_layers(n))
        exact = TensorFormat((FP16_BITS,) * h, "token", "none", hadamard=False)
        layers = [LayerFormat(d, 1, exact, exact) if i in skip else LayerFormat(d, 1, kf, vf) for i in range(n)]
        return CacheScheme(name, layers, False)
    raise ValueError(f"unknown preset {name!r}; valid presets are {list(PRESETS)}")


class SchemeAttention:
    """Handler: attention that reads completed tiles as ``scheme`` stores them (fp16 if None).

    ``softcap``: the model's ``attn_logit_softcapping`` (Gemma-2: scores capped by
    ``softcap * tanh(s / softcap)`` before the mask), or None. The reading rule is
    ``tiled_attention``'s; ``kvarn.quant.reference.scheme_attention_ref`` is the earlier whole-sequence
    implementation it is tested against.
    """

    def __init__(self, scheme: CacheScheme | None, softcap: float | None = None):
        self.scheme = scheme
        self.softcap = softcap

    def quantized_kv(self, layer_idx, k16, v16):
        """``(k_hat, v_hat)`` of one layer's fp16-rounded ``[B, H, T, D]`` K/V as the scheme stores them."""
        s = self.scheme
        fmt = s.layers[layer_idx]
        kp = None if s.k_log_std is None else s.k_log_std[layer_idx]
        vp = None if s.v_log_std is None else s.v_log_std[layer_idx]
        return (fake_quantize_sequence(k16, fmt.k, fmt.tile, s.keep_first_tile, kp, s.iters),
                fake_quantize_sequence(v16, fmt.v, fmt.tile, s.keep_first_tile, vp, s.iters))

    def attend(self, layer_idx, q, k, v, bias, scaling, softcap=None):
        # A runtime receives K/V in fp16/bf16 and quantizes those: so do we.
        k16, v16 = k.float().half().float(), v.float().half().float()
        cap = softcap if softcap is not None else self.softcap
        s = self.scheme
        if s is None:
            return tiled_attention(q, k16, v16, None, None, 1, False, bias, scaling, cap)
        k_hat, v_hat = self.quantized_kv(layer_idx, k16, v16)
        return tiled_attention(q, k16, v16, k_hat, v_hat, s.layers[layer_idx].tile, s.keep_first_tile, bias, scaling, cap)
