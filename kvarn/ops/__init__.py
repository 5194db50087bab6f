"""Ops of the serving path, each with a PyTorch reference and a Triton kernel beside it.

* ``store``  — encode completed tiles (all heads of a layer) into their pages.
* ``decode`` — attention of query rows over a sequence's quantized pages (rotated basis), merged
  with its fp16 part (first tile, open tail, the step's own keys).
* ``dequant`` — completed tiles back to token rows in the model's basis (what a prefill chunk's
  FlashAttention reads of the cached past).

``kvarn.ops.layout.PageLayout`` owns the byte layout both read. ``backend()`` says which
implementation runs: Triton on CUDA tensors when triton imports, the reference otherwise;
``KVARN_OPS=reference|triton`` forces one (``triton`` on CPU needs ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no triton here"
        return False
    return True


def backend(t: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for ops on tensor ``t``."""
    forced = os.environ.get("KVARN_OPS", "")
    if forced in ("reference", "triton"):
        return forced
    return "triton" if t.is_cuda and triton_available() else "reference"


def triton_unsupported(op: str, head_dim: int, softcap: float | None = None) -> str | None:
    """Why the Triton kernel of ``op`` cannot run this layer (None: it can). The kernels index
    ``tl.arange(0, D)``, so D must be a power of two, and the decode kernel has no soft-capping.
    The first time a reason comes up it is logged in one line; the caller runs the reference op."""
    reason = None
    if head_dim & (head_dim - 1):
        reason = f"head_dim {head_dim} is not a power of two"
    elif softcap and op == "decode":
        reason = "attention-logit soft-capping"
    if reason is not None:
        _warn_once(op, reason)
    return reason


@functools.lru_cache(maxsize=None)
def _warn_once(op: str, reason: str) -> None:
    logger.warning("kvarn: the Triton %s kernel does not support %s; using the PyTorch reference op (slower)",
                   op, reason)
