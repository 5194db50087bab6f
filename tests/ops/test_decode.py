"""Triton decode kernels against the PyTorch reference (``kvarn.ops.decode.reference``).

Fresh random inputs, irregular shapes (sequence lengths that are not multiples of the tile, open
tiles of 0..G tokens, sequences without a first-tile copy), every width per head, head_dim
64/128/256, GQA groups 1/4/7. On the CPU the kernels run in the Triton interpreter (sizes kept
small); on a CUDA machine the same cases run compiled. Outputs and workspaces are poisoned with
NaN first, so an element no program writes fails. Tolerance: the kernels take fp16 operands into
their dots (scaled query, probabilities, codes) and accumulate in fp32: relative Frobenius error
below 3e-3 (fp16 rounding is ~5e-4 per operand; seen ~5e-4).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from kvarn.ops.decode import reference as ref  # noqa: E402
from kvarn.ops.decode import triton as tri  # noqa: E402
from kvarn.ops.layout import PageLayout  # noqa: E402
from kvarn.ops.store.reference import store_tiles  # noqa: E402
from kvarn.quant.formats import LayerFormat, TensorFormat  # noqa: E402

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]  # cpu: the interpreter (tests/conftest.py)
TOL = 3e-3


def _rel(got, want, name):
    assert not torch.isnan(got).any(), f"{name}: NaN in the kernel's output (an element was not written)"
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert err < TOL, f"{name}: relative error {err:.2e} >= {TOL:.0e}"
    return err


def _layout(d, g, kbits, vbits, knorm, vnorm, codec="rtn", seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = len(kbits)
    kf = TensorFormat(tuple(kbits), "channel", knorm, clip=True, codec=codec)
    vf = TensorFormat(tuple(vbits), "token", vnorm, clip=True, codec=codec)
    return PageLayout(LayerFormat(d, g, kf, vf), torch.randn(h, d, generator=gen) * 0.3,
                      torch.randn(h, d, generator=gen) * 0.3)


def _pages(lay, n_tiles, device, gen):
    """Pages holding ``n_tiles[b]`` encoded tiles per sequence at shuffled block ids (block 0 unused)."""
    h, g, d = lay.num_kv_heads, lay.tile, lay.head_dim
    total = sum(n_tiles)
    nblocks = total + 3
    pages = torch.randint(0, 256, (nblocks, lay.nbytes + 10), generator=gen, dtype=torch.uint8)  # padded pages
    order = (torch.randperm(nblocks - 1, generator=gen) + 1).to(torch.int32)
    width = max(max(n_tiles), 1) + 2
    table = torch.zeros(len(n_tiles), width, dtype=torch.int32)
    at = 0
    for b, n in enumerate(n_tiles):
        table[b, :n] = order[at:at + n]
        at += n
    ids = order[:total]
    scales = torch.rand(d, generator=gen) * 3 + 0.2
    k = torch.randn(total, h, g, d, generator=gen) * scales
    k[..., 5] += 4.0  # an outlier channel
    v = torch.randn(total, h, g, d, generator=gen)
    store_tiles(lay, pages, k, v, ids)
    return pages.to(device), table.to(device)


CASES = [  # d, tile, group, kbits, vbits, knorm, vnorm, codec
    (64, 64, 4, (4, 2), (2, 4), "tile", "tile", "rtn"),
    (64, 64, 1, (3, 8), (3, 16), "none", "static", "rtn"),
    (128, 64, 7, (16, 4), (8, 2), "tile", "none", "rtn"),
    (64, 128, 4, (2, 3), (4, 3), "none", "tile", "rtn"),
    (64, 64, 4, (8, 8), (8, 8), "none", "none", "fp8"),
    (256, 64, 1, (4,), (2,), "tile", "static", "rtn"),
]


# code→fp16 conversions: 0 plain, 1 exponent trick (plain Triton), 2 inline PTX (compiled GPU only)
CVTS = (0, 1, 2) if torch.cuda.is_available() else (1,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}-g{c[1]}-gqa{c[2]}-k{c[3]}-v{c[4]}-{c[5]}-{c[6]}-{c[7]}")
def test_decode_matches_reference(case, device):
    d, g, group, kbits, vbits, knorm, vnorm, codec = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    lay = _layout(d, g, kbits, vbits, knorm, vnorm, codec)
    h = lay.num_kv_heads
    n_tiles = [3, 1, 0, 2]  # completed tiles per sequence (0: the query is in the first tile)
    b = len(n_tiles)
    pages, table = _pages(lay, n_tiles, device, gen)
    slots = 2 * b + 1
    staging = torch.randn(slots, 2, h, g, d, generator=gen).half().to(device)
    q = (torch.randn(b, h * group, d, generator=gen) * 2).to(device)
    page_start = torch.tensor([1, 0, 0, 1], dtype=torch.int32, device=device)  # 1: first tile read fp16
    q_tile = torch.tensor(n_tiles, dtype=torch.int32, device=device)
    first = torch.tensor([0, -1, -1, 2], dtype=torch.int32, device=device)
    cur = torch.tensor([1, 3, 4, 5], dtype=torch.int32, device=device)
    cur_len = torch.tensor([7, 1, g - 1, g], dtype=torch.int32, device=device)
    scale = d ** -0.5
    want = ref.decode(lay, pages, staging, q, table, page_start, q_tile, first, cur, cur_len, scale)
    for splits, cvt, prefetch in [(1, CVTS[0], False), (3, CVTS[-1], True)] + [(2, c, False) for c in CVTS[1:-1]]:
        ws = (torch.full((splits + 1, b, h * group, d), float("nan"), device=device),
              torch.full((splits + 1, b, h * group), float("nan"), device=device))
        out = torch.full_like(q, float("nan"))
        tri.decode(lay, pages, staging, q, table, page_start, q_tile, first, cur, cur_len, scale, out=out,
                   workspace=ws, bt=g if prefetch or device != "cpu" else min(g, 32), cvt=cvt, prefetch=prefetch)
        _rel(out, want, f"decode out (splits={splits}, cvt={cvt}, prefetch={prefetch})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=["k42v24", "gqa7-d128", "k23v43-g128"])
def test_paged_attention_prefill_rows_match_reference(case, device):
    """Prefill continuation: several query tokens per sequence, each reading the tiles below its own."""
    d, g, group, kbits, vbits, knorm, vnorm, codec = case
    gen = torch.Generator().manual_seed(7 + hash(case) % 2**31)
    lay = _layout(d, g, kbits, vbits, knorm, vnorm, codec, seed=1)
    h = lay.num_kv_heads
    n_tiles = [4, 2]
    pages, table = _pages(lay, n_tiles, device, gen)
    # sequence 0: 5 queries in tiles 2..4 (a chunk that straddles tiles); sequence 1: 3 in tile 1..2
    q_seq = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1], device=device)
    q_tile = torch.tensor([2, 3, 3, 4, 4, 1, 2, 2], dtype=torch.int32, device=device)
    page_start = torch.tensor([1, 0], dtype=torch.int32, device=device)
    q = torch.randn(len(q_seq), h * group, d, generator=gen).to(device)
    scale = d ** -0.5
    want_o, want_lse = ref.paged_attention(lay, pages, q, q_seq, q_tile, page_start, table, scale)
    for splits in (1, 2):
        o, lse = tri.paged_attention(lay, pages, q, q_seq, q_tile, page_start, table, scale, num_splits=splits,
                                     bt=32 if device == "cpu" else None, poison=True)
        _rel(o, want_o, f"paged_attention o (splits={splits})")
        _rel(lse, want_lse, f"paged_attention lse (splits={splits})")


def test_rows_without_tiles_read_nothing():
    """A query in the first tile reads no page: out 0 and lse -inf, never NaN."""
    lay = _layout(64, 64, (4,), (2,), "tile", "tile")
    gen = torch.Generator().manual_seed(3)
    dev = DEVICES[0]
    pages, table = _pages(lay, [1], dev, gen)
    q = torch.randn(2, 4, 64, generator=gen).to(dev)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)  # noqa: E731
    o, lse = tri.paged_attention(lay, pages, q, i32([0, 0]), i32([0, 1]), i32([0]), table, 0.125, bt=32, poison=True)
    assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.isinf(lse[0]).all() and (lse[0] < 0).all(), \
        "row with no tiles: expected out 0 and lse -inf"
    want_o, _ = ref.paged_attention(lay, pages, q, i32([0, 0]), i32([0, 1]), i32([0]), table, 0.125)
    _rel(o[1], want_o[1], "row with one tile")


def test_default_decode_kernels_spill_at_most_the_limit_on_sm90():
    """Compiled for the H200 here (triton.compile for sm_90 + the wheel's ptxas, no GPU): spilled
    registers go to local memory and cap the kernel far below the bandwidth limit (measured: a
    prologue that spilled 3.2 KB per thread made decode 2x slower than bf16). The bound is
    ``SPILL_LIMIT`` bytes per thread, not zero: the fastest measured default spills 192 B."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(root / "bench" / "kernels_ptxas.py"), "--check"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0 and "spilling" not in res.stdout:
        pytest.skip(f"could not compile for sm_90 here: {res.stderr.strip().splitlines()[-1:]}")
    assert res.returncode == 0, res.stdout[-2000:]
