"""kvarn.quant.pack against a Python-int reference of the documented layout.

Reference: at 1/2/4/8 bits a row's stream is the integer sum(code_i << (i * b)); its bytes are that
integer's little-endian bytes (byte j = stream bits [8j, 8j+8), bit 8j least significant). At 3 bits:
the 2-bit stream of the low bits, then the 1-bit stream of the high bits.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvarn.quant.pack import pack_bits, packed_size, unpack_bits



BITS = [1, 2, 3, 4, 8]


def ref_pack_row(codes: list[int], b: int) -> list[int]:
    if b == 3:  # two planes: the low 2 bits as a 2-bit stream, then the high bit as a 1-bit stream
        return ref_pack_row([c & 3 for c in codes], 2) + ref_pack_row([c >> 2 for c in codes], 1)
    stream = 0
    for i, c in enumerate(codes):
        stream |= c << (i * b)
    return list(stream.to_bytes(len(codes) * b // 8, "little"))


def ref_unpack_row(data: list[int], b: int, n: int) -> list[int]:
    if b == 3:
        lo, hi = ref_unpack_row(data[: n // 4], 2, n), ref_unpack_row(data[n // 4:], 1, n)
        return [a | (h << 2) for a, h in zip(lo, hi)]
    stream = int.from_bytes(bytes(data), "little")
    return [(stream >> (i * b)) & ((1 << b) - 1) for i in range(n)]


@settings(max_examples=50, deadline=None)
@given(b=st.sampled_from(BITS), lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
       units=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_match_reference(b, lead, units, seed):
    n = units * 8  # n * b is a multiple of 8 for every b
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**b, (*lead, n), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, b)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, n * b // 8), \
        f"packed {packed.dtype} {tuple(packed.shape)}, expected {(*lead, n * b // 8)}"
    rows_c = codes.reshape(-1, n).tolist()
    rows_p = packed.reshape(-1, n * b // 8).tolist()
    for r, (c, p) in enumerate(zip(rows_c, rows_p)):
        assert p == ref_pack_row(c, b), f"packed row {r} (b={b}) != little-endian stream reference"
    back = unpack_bits(packed, b, n)
    assert back.dtype == torch.uint8 and torch.equal(back, codes), f"unpack(pack(codes)) != codes at b={b}"
    # unpack independently of pack: random bytes
    rnd = torch.randint(0, 256, packed.shape, generator=gen, dtype=torch.int64).to(torch.uint8)
    got = unpack_bits(rnd, b, n).reshape(-1, n).tolist()
    for r, p in enumerate(rnd.reshape(-1, n * b // 8).tolist()):
        assert got[r] == ref_unpack_row(p, b, n), f"unpack of random bytes row {r} (b={b}) != reference"


@pytest.mark.parametrize("b,n", [(2, 4), (4, 2), (3, 8), (1, 8), (2, 12), (4, 6), (8, 3), (1, 16)])
def test_round_trip_short_rows(b, n):
    gen = torch.Generator().manual_seed(b * 100 + n)
    codes = torch.randint(0, 2**b, (3, n), generator=gen).to(torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, b), b, n), codes)


def test_documented_layout_b4():
    # code 0 = low nibble of byte 0, code 1 = high nibble: [1, 2] -> 0x21
    got = pack_bits(torch.tensor([1, 2], dtype=torch.uint8), 4)
    assert got.tolist() == [0x21], f"b=4 [1, 2] packed to {[hex(v) for v in got.tolist()]}, expected [0x21]"
    got = pack_bits(torch.tensor([0xF, 0x0, 0x3, 0xA], dtype=torch.uint8), 4)
    assert got.tolist() == [0x0F, 0xA3], f"b=4 [15, 0, 3, 10] packed to {got.tolist()}"


def test_documented_layout_b2():
    # code 0 in bits 0-1, code 1 in bits 2-3, ...: [1, 2, 3, 0] -> 00 11 10 01
    got = pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2)
    assert got.tolist() == [0b00111001], f"b=2 [1,2,3,0] packed to {bin(got.tolist()[0])}, expected 0b00111001"


def test_documented_layout_b3():
    # two planes: lo = codes & 3 as a 2-bit stream (2 bytes for 8 codes), hi = codes >> 2 as a
    # 1-bit stream (1 byte). codes 1..7, 0: lo = 1,2,3,0,1,2,3,0 -> 0b00_11_10_01 twice = 0x39, 0x39;
    # hi = 0,0,0,1,1,1,1,0 (bit i = code i) -> 0b0111_1000 = 0x78
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    got = pack_bits(codes, 3)
    assert got.tolist() == [0x39, 0x39, 0x78], f"b=3 packed to {[hex(v) for v in got.tolist()]}, expected [0x39, 0x39, 0x78]"
    assert unpack_bits(got, 3, 8).tolist() == codes.tolist()


def test_documented_layout_b1():
    got = pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.uint8), 1)
    assert got.tolist() == [0x81, 0x02], f"b=1 packed to {got.tolist()}, expected [0x81, 0x02]"


def test_wrong_lengths_raise():
    packed = pack_bits(torch.zeros(2, 8, dtype=torch.uint8), 3)  # 3 bytes per row
    with pytest.raises(ValueError):
        unpack_bits(packed, 3, 16)  # needs 6 bytes
    with pytest.raises(ValueError):
        unpack_bits(packed[..., :2], 3, 8)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(5, dtype=torch.uint8), 4, 8)  # 4 bytes expected
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(3, dtype=torch.uint8), 3)  # 9 bits, not whole bytes
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(8, dtype=torch.uint8), 9)
    with pytest.raises(ValueError):
        packed_size(5, 4)
    assert packed_size(64, 3) == 24 and packed_size(128, 4) == 64 and packed_size(64, 8) == 64
