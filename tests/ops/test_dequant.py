"""Triton dequant kernel against the PyTorch reference (``kvarn.ops.dequant.reference``, i.e.
``PageLayout.decode``).

Fresh irregular tiles are stored (reference store) at scattered block ids of pages whose other
blocks hold random bytes; both implementations read them back as token rows. Layers mix every
width (1/2/3/4/8 bits, fp16) per head, K normalize "tile"/"none", V "tile"/"static"/"none",
Hadamard on and off, fp8 heads, head_dim 64/128, tiles of 64/128. float32 output: equal to the
reference within 1e-5 relative (the kernel's rotation is a ``tl.dot``, another summation order;
tf32 on a GPU: 2e-3 there); bf16 output within bf16 rounding (1e-2). A block id list that repeats
and is out of order reads the same tiles in that order.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # set before triton imports
triton = pytest.importorskip("triton", reason="triton is not installed")

from kvarn.ops.dequant import reference as ref  # noqa: E402
from kvarn.ops.dequant import triton as tri  # noqa: E402
from kvarn.ops.layout import PageLayout  # noqa: E402
from kvarn.ops.store import reference as store_ref  # noqa: E402
from kvarn.quant.formats import LayerFormat, TensorFormat  # noqa: E402

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]

# name: (d, g, kbits, vbits, knorm, vnorm, hadamard, codec, n)
CASES = {
    "d64-g64-all-widths-tile": (64, 64, (2, 3, 4, 8, 16, 1), (16, 8, 4, 3, 2, 1), "tile", "tile", True, "rtn", 3),
    "d128-g128-none-static": (128, 128, (4, 4, 2), (2, 3, 2), "none", "static", True, "rtn", 2),
    "d64-g128-no-hadamard": (64, 128, (4, 2), (2, 3), "tile", "none", False, "rtn", 2),
    "d64-g64-fp8": (64, 64, (8, 16, 8), (8, 8, 16), "none", "none", True, "fp8", 2),
}


def _case(name, device):
    d, g, kbits, vbits, knorm, vnorm, had, codec, n = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)) + int.from_bytes(os.urandom(2), "little"))
    h = len(kbits)
    kf = TensorFormat(tuple(kbits), "channel", knorm, had, True, codec)
    vf = TensorFormat(tuple(vbits), "token", vnorm, had, True, codec)
    lay = PageLayout(LayerFormat(d, g, kf, vf), torch.randn(h, d, generator=gen) * 0.3,
                     torch.randn(h, d, generator=gen) * 0.3)
    scales = torch.linspace(0.1, 5, d)[torch.randperm(d, generator=gen)]
    k = torch.randn(n, h, g, d, generator=gen) * scales
    v = torch.randn(n, h, g, d, generator=gen) + torch.randn(n, h, g, 1, generator=gen)
    num_blocks = 3 * n + 2
    pages = torch.randint(0, 256, (num_blocks, lay.nbytes + 6), dtype=torch.uint8, generator=gen)
    ids = torch.randperm(num_blocks, generator=gen)[:n]
    store_ref.store_tiles(lay, pages, k, v, ids)
    read = torch.cat([ids.flip(0), ids[:1]])  # out of order, one tile twice
    return lay, pages.to(device), read.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_dequant_matches_reference(name, device):
    lay, pages, read = _case(name, device)
    want_k, want_v = ref.dequant_tiles(lay, pages, read, torch.float32)
    assert want_k.shape == (read.numel() * lay.tile, lay.num_kv_heads, lay.head_dim)
    tol32 = 2e-3 if device == "cuda" else 1e-5
    for dtype, tol in ((torch.float32, tol32), (torch.bfloat16, 1e-2)):
        got_k, got_v = tri.dequant_tiles(lay, pages, read, dtype)
        assert got_k.dtype == dtype and got_k.shape == want_k.shape
        for kind, got, want in (("K", got_k, want_k), ("V", got_v, want_v)):
            for hd in range(lay.num_kv_heads):
                a, b = got[:, hd].float(), want[:, hd]
                err = ((a - b).norm() / b.norm()).item()
                assert err < tol, f"{kind} head {hd}, {dtype}: relative error {err:.2e} >= {tol:.0e}"


def test_no_tiles_gives_empty_rows():
    lay, pages, _ = _case("d64-g128-no-hadamard", DEVICES[0])
    k, v = tri.dequant_tiles(lay, pages, torch.zeros(0, dtype=torch.int64, device=pages.device), torch.float16)
    assert k.shape == v.shape == (0, lay.num_kv_heads, lay.head_dim)
