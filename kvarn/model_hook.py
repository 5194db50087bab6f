"""Route a transformers model's attention through kvarn without editing model code.

``attach(model, handler)`` registers an attention implementation named ``"kvarn"`` through
transformers' public ``AttentionInterface`` (and an eager additive mask through
``AttentionMaskInterface``), points the model's config at it and gives every attention module a
``handler``. The handler sees the tensors exactly as an inference engine caches them: post-RoPE
keys and values ``[B, H, T, D]`` before any GQA repeat, and queries ``[B, Hq, Tq, D]``.

A handler has one method: ``attend(layer_idx, q, k, v, bias, scaling) -> [B, Hq, Tq, D]``; for a
model with attention-logit soft-capping (Gemma-2's ``attn_logit_softcapping``, which transformers
passes to the attention function as ``softcap``) it is called with ``softcap=cap`` as well, and
must apply ``scores = cap * tanh(scores / cap)`` before the mask and softmax. A handler that takes
no ``softcap`` keyword is refused in one line on such a model.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from .errors import KvarnError
from .quant.attention import mixed_attention

ATTN_NAME = "kvarn"
_registered = False


def _kvarn_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise KvarnError(f"{type(module).__name__}: attention sinks are not supported by kvarn yet; use a model without them")
    # the model passes its cap (Gemma-2: softcap=config.attn_logit_softcapping); None/0: no capping
    softcap = kwargs.get("softcap") if "softcap" in kwargs else getattr(module.config, "attn_logit_softcapping", None)
    softcap = float(softcap) if softcap else None
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    handler = getattr(module, "_kvarn_handler", None)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros_like(attention_mask, dtype=torch.float32).masked_fill(~attention_mask, float("-inf"))
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]
    if handler is None:
        out = mixed_attention(query, key, value, None, None, None, attention_mask, scaling, softcap)
    elif softcap is None:
        out = handler.attend(module.layer_idx, query, key, value, attention_mask, scaling)
    elif _takes_softcap(type(handler)):
        out = handler.attend(module.layer_idx, query, key, value, attention_mask, scaling, softcap=softcap)
    else:
        raise KvarnError(f"{type(module).__name__}: attention logit soft-capping (cap {softcap:g}) is not supported by "
                         f"{type(handler).__name__} yet; use a model without attn_logit_softcapping")
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=32)
def _takes_softcap(handler_type) -> bool:
    return "softcap" in inspect.signature(handler_type.attend).parameters


def register() -> None:
    """Register the ``"kvarn"`` attention and mask implementations once per process."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_NAME, _kvarn_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)
    _registered = True


def attention_modules(model) -> list:
    """The model's self-attention modules, in layer order (those with a ``layer_idx``)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config") and (hasattr(m, "k_proj") or hasattr(m, "qkv_proj"))]
    mods.sort(key=lambda m: m.layer_idx)
    return mods


def _configs(model):
    seen, out = set(), []
    for c in [model.config] + [m.config for m in attention_modules(model)]:
        if id(c) not in seen:
            seen.add(id(c))
            out.append(c)
    return out


def install(model, handler) -> None:
    """Make every attention module of ``model`` call ``handler`` (until ``uninstall``)."""
    register()
    for cfg in _configs(model):
        if not hasattr(cfg, "_kvarn_saved_attn"):
            cfg._kvarn_saved_attn = cfg._attn_implementation
        cfg._attn_implementation = ATTN_NAME
    for m in attention_modules(model):
        m._kvarn_handler = handler


def uninstall(model) -> None:
    for m in attention_modules(model):
        m._kvarn_handler = None
    for cfg in _configs(model):
        if hasattr(cfg, "_kvarn_saved_attn"):
            cfg._attn_implementation = cfg._kvarn_saved_attn
            del cfg._kvarn_saved_attn


@contextlib.contextmanager
def attached(model, handler):
    install(model, handler)
    try:
        yield handler
    finally:
        uninstall(model)
