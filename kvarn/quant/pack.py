"""Exact bit packing of b-bit codes into uint8.

Byte layout (little-endian bit stream): code ``i`` of a row occupies bits ``[i*b, (i+1)*b)`` of the
row's bit stream, least significant bit first, and byte ``j`` holds stream bits ``[8j, 8j+8)``
with stream bit ``8j`` as the byte's least significant bit. So at b=4, code 0 is the low nibble of
byte 0; at b=2, code 0 is bits 0-1 of byte 0; at b=3, 8 codes fill 3 bytes. Rows are packed
independently along the last dim, whose length times ``bits`` must be a multiple of 8.
"""

from __future__ import annotations

import torch


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take; ``n * bits`` must be a multiple of 8."""
    if (n * bits) % 8:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes")
    return n * bits // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., N]`` (each < 2**bits) into ``[..., N*bits/8]`` uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits has to be in 1..8 but got {bits}")
    n = codes.shape[-1]
    nbytes = packed_size(n, bits)
    if bits == 8:
        return codes.to(torch.uint8).clone()
    c = codes.to(torch.int32)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    stream = (c[..., None] >> shifts) & 1  # [..., N, bits], LSB first
    stream = stream.reshape(*codes.shape[:-1], nbytes, 8)
    weights = 1 << torch.arange(8, device=codes.device, dtype=torch.int32)
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: ``[..., N*bits/8]`` uint8 → ``[..., N]`` uint8 codes."""
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(
            f"expected {packed_size(n, bits)} packed bytes for {n} codes of {bits} bits "
            f"rather than {packed.shape[-1]}"
        )
    if bits == 8:
        return packed.to(torch.uint8).clone()
    p = packed.to(torch.int32)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    stream = ((p[..., None] >> shifts) & 1).reshape(*packed.shape[:-1], n, bits)
    weights = 1 << torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream * weights).sum(-1).to(torch.uint8)
