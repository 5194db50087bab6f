"""Exact bit packing of b-bit codes into uint8: the byte order every kvarn reader and kernel uses.

Widths 1, 2, 4 and 8 (byte-aligned, ``8 / b`` codes per byte): a little-endian bit stream per row.
Code ``i`` occupies bits ``[i*b, (i+1)*b)`` of the row's stream, least significant bit first, and
byte ``j`` holds stream bits ``[8j, 8j+8)``. So at b=4, code 0 is the low nibble of byte 0 and
code 1 its high nibble; at b=2, codes 0..3 are bits 0-1, 2-3, 4-5, 6-7 of byte 0.

Width 3 is stored as two planes so that a kernel reads every field byte-aligned (a 3-bit stream
has codes that straddle bytes): first the low two bits of each code as a 2-bit stream (``N/4``
bytes), then the high bit of each code as a 1-bit stream (``N/8`` bytes): ``3N/8`` bytes, the
same size as a stream. Code ``i`` is ``lo[i] | hi[i] << 2``.

Rows are packed independently along the last dim, whose length times ``bits`` must be a multiple
of 8 (a multiple of 8 codes at 3 bits).
"""

from __future__ import annotations

import torch


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take; ``n * bits`` must be a multiple of 8."""
    if (n * bits) % 8 or (bits == 3 and n % 8):
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes")
    return n * bits // 8


def _pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    c = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def _unpack_stream(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per).to(torch.uint8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[..., N]`` (each < 2**bits) into ``[..., N*bits/8]`` uint8."""
    if not 1 <= bits <= 8 or bits in (5, 6, 7):
        raise ValueError(f"bits has to be one of [1, 2, 3, 4, 8] but got {bits}")
    packed_size(codes.shape[-1], bits)
    if bits == 8:
        return codes.to(torch.uint8).clone()
    if bits == 3:
        c = codes.to(torch.int32)
        return torch.cat([_pack_stream(c & 3, 2), _pack_stream(c >> 2, 1)], -1)
    return _pack_stream(codes, bits)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: ``[..., N*bits/8]`` uint8 → ``[..., N]`` uint8 codes."""
    if packed.shape[-1] != packed_size(n, bits):
        raise ValueError(
            f"expected {packed_size(n, bits)} packed bytes for {n} codes of {bits} bits "
            f"rather than {packed.shape[-1]}"
        )
    if bits == 8:
        return packed.to(torch.uint8).clone()
    if bits == 3:
        lo = _unpack_stream(packed[..., : n // 4], 2)
        hi = _unpack_stream(packed[..., n // 4:], 1)
        return lo | (hi << 2)
    return _unpack_stream(packed, bits)
