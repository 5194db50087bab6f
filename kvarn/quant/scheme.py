"""A whole-model cache scheme: per-layer formats + fp16 first tile + priors, and its reference reader.

``CacheScheme`` is what a recipe or a preset turns into; ``SchemeAttention`` is the handler (see
``kvarn.model_hook``) that evaluates a forward pass the way the runtime reads such a cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .attention import mixed_attention, quantized_read_mask
from .codec import NORMALIZE_ITERS, fake_quantize_sequence
from .formats import LayerFormat, TensorFormat, bits_per_element, fp16_tokens_per_sequence


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
           "int4-per-token-head", "kivi-2", "fp8-e4m3")


def preset_scheme(name: str, num_layers: int, num_kv_heads: int, head_dim: int) -> CacheScheme:
    """Calibration-free schemes: KVarN's uniform presets (the seed) and the usual baselines.

    kvarn-kXvY-g128: Hadamard + per-tile variance normalization + min/max RTN, first tile fp16
    (``-nosink``: the first tile is quantized too).
    int4-per-token-head: per token and head symmetric int4 (fp16 absmax scale), quantized on write (vLLM's int4_per_token_head).
    kivi-2: KIVI, 2-bit keys per channel / values per token, group 128, fp16 residual 128, no
    rotation. fp8-e4m3: cast on write with unit scale (vLLM's fp8 cache default).
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
    raise ValueError(f"unknown preset {name!r}; valid presets are {list(PRESETS)}")


class SchemeAttention:
    """Handler: attention that reads completed tiles as ``scheme`` stores them (fp16 if None)."""

    def __init__(self, scheme: CacheScheme | None):
        self.scheme = scheme

    def attend(self, layer_idx, q, k, v, bias, scaling, softcap=None):
        # A runtime receives K/V in fp16/bf16 and quantizes those: so do we.
        k16, v16 = k.float().half().float(), v.float().half().float()
        s = self.scheme
        if s is None:
            return mixed_attention(q, k16, v16, None, None, None, bias, scaling, softcap)
        fmt = s.layers[layer_idx]
        kp = None if s.k_log_std is None else s.k_log_std[layer_idx]
        vp = None if s.v_log_std is None else s.v_log_std[layer_idx]
        k_hat = fake_quantize_sequence(k16, fmt.k, fmt.tile, s.keep_first_tile, kp, s.iters)
        v_hat = fake_quantize_sequence(v16, fmt.v, fmt.tile, s.keep_first_tile, vp, s.iters)
        t = k.shape[-2]
        pos = torch.arange(t, device=k.device)
        mask = quantized_read_mask(pos[t - q.shape[-2]:], pos, fmt.tile, s.keep_first_tile)
        return mixed_attention(q, k16, v16, k_hat, v_hat, mask, bias, scaling, softcap)
