"""Ops of the serving path, each with a PyTorch reference and a Triton kernel beside it.

* ``store``  — encode completed tiles (all heads of a layer) into their pages.
* ``decode`` — attention of query rows over a sequence's quantized pages (rotated basis), merged
  with its fp16 part (first tile, open tail, the step's own keys).

``kvarn.ops.layout.PageLayout`` owns the byte layout both read. ``backend()`` says which
implementation runs: Triton on CUDA tensors when triton imports, the reference otherwise;
``KVARN_OPS=reference|triton`` forces one (``triton`` on CPU needs ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import os

import torch


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
