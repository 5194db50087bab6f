"""Small host→device copies of per-step metadata without device syncs (one place for the rule).

A copy from pageable memory waits for all GPU work queued before it (the H200 profile of
2026-12-03 counted two such waits per layer in prefill steps, from a device tensor indexed with a
Python list). With vLLM's async scheduling the host must never wait for the GPU, so copies go from
persistent pinned buffers (``_PinnedRing``) rather than a fresh pinned allocation per call.
"""

from __future__ import annotations

import torch


def to_device(values: list[int], dtype: torch.dtype, device) -> torch.Tensor:
    """A host list as a device tensor without a device sync.

    CUDA copies go through ``_PinnedRing``: persistent pinned buffers, reused only once their last
    copy is done; elsewhere a plain tensor."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return _ring(device).put(values, dtype)


class _PinnedRing:
    """Pinned host buffers used round-robin as the source of small host→device copies.

    Slot ``i`` is refilled only after the event recorded behind its last copy has completed (the
    GPU is rarely ``SLOTS`` copies behind, so the wait is almost always free). Each copy lands in
    a fresh tensor of torch's caching allocator, so a result stays valid as long as it is referenced
    (a step's metadata is read by every layer)."""

    SLOTS = 16

    def __init__(self, device: torch.device):
        self.device = device
        self.host: list[torch.Tensor | None] = [None] * self.SLOTS
        self.done: list[torch.cuda.Event | None] = [None] * self.SLOTS
        self.next = 0

    def put(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        n = len(values)
        nbytes = max(8, n * dtype.itemsize)
        i = self.next
        self.next = (i + 1) % self.SLOTS
        if self.done[i] is not None:
            self.done[i].synchronize()
        if self.host[i] is None or self.host[i].numel() < nbytes:
            self.host[i] = torch.empty(1 << (nbytes - 1).bit_length(), dtype=torch.uint8, pin_memory=True)
        host = self.host[i][:nbytes].view(dtype)[:n]
        host.copy_(torch.tensor(values, dtype=dtype))
        out = torch.empty(n, dtype=dtype, device=self.device)
        out.copy_(host, non_blocking=True)
        ev = self.done[i] = self.done[i] or torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return out


_rings: dict[torch.device, _PinnedRing] = {}


def _ring(device: torch.device) -> _PinnedRing:
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _rings:
        _rings[device] = _PinnedRing(device)
    return _rings[device]
