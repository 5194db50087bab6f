"""The register-fed tensor-core decode kernel (``kvarn.ops.decode.mma``) against the reference.

On a CUDA GPU (sm_80+): the decode op with the mma kernel on and off against
``reference.decode`` on fresh random, irregular inputs — head_dim 128, tiles of 64/128 tokens,
GQA groups 1/4/7/8/16, every normalization the kernel takes, recipes whose other head groups run
the Triton kernel in the same launch sequence, sequences with 0..5 completed tiles, 1 and 3
splits. Outputs and workspaces start as NaN, so an element no program writes fails. Tolerance as
``test_decode.py`` (fp16 operands, fp32 accumulation).

Without a GPU: the kernel is compiled for the H200 (sm_90) here and its PTX read: the layout
conversions that feed the tensor cores must be register-only (``assert_trivial``), with no shared
memory or barrier, and ptxas must not spill more than the decode limit. Gluon has no interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

from kvarn.ops.decode import reference as ref  # noqa: E402
from kvarn.ops.decode import triton as tri  # noqa: E402

from test_decode import _layout, _pages, _rel  # noqa: E402  (pytest puts tests/ops on sys.path)

CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8

CASES = [  # tile, group, kbits, vbits, knorm, vnorm
    (128, 4, (4, 4, 4), (2, 2, 2), "tile", "tile"),      # the K4V2 preset's format, Llama-3.1-8B's GQA
    (64, 7, (4, 2), (2, 4), "none", "static"),           # a recipe mix: head 0 mma, head 1 Triton
    (128, 8, (4, 3, 4), (2, 2, 4), "none", "none"),
    (64, 1, (4,), (2,), "tile", "none"),
    (128, 16, (4, 4), (2, 2), "none", "tile"),
]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (sm_80+): Gluon kernels have no interpreter")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"g{c[0]}-gqa{c[1]}-k{c[2]}-v{c[3]}-{c[4]}-{c[5]}")
def test_mma_decode_matches_reference(case):
    g, group, kbits, vbits, knorm, vnorm = case
    d, dev = 128, "cuda"
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    lay = _layout(d, g, kbits, vbits, knorm, vnorm)
    h = lay.num_kv_heads
    n_tiles = [5, 1, 0, 2, 3]
    b = len(n_tiles)
    pages, table = _pages(lay, n_tiles, dev, gen)
    staging = torch.randn(2 * b + 1, 2, h, g, d, generator=gen).half().to(dev)
    q = (torch.randn(b, h * group, d, generator=gen) * 2).to(dev).to(torch.bfloat16)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=dev)  # noqa: E731
    page_start, q_tile = i32([1, 0, 0, 1, 0]), i32(n_tiles)
    first, cur, cur_len = i32([0, -1, -1, 2, -1]), i32([1, 3, 4, 5, 6]), i32([7, 1, g - 1, g, 33])
    scale = d ** -0.5
    want = ref.decode(lay, pages, staging, q.float(), table, page_start, q_tile, first, cur, cur_len, scale)
    for splits, mma in [(1, True), (3, True), (2, "pipe"), (1, False)]:
        ws = (torch.full((splits + 1, b, h * group, d), float("nan"), device=dev),
              torch.full((splits + 1, b, h * group), float("nan"), device=dev))
        out = torch.full((b, h * group, d), float("nan"), device=dev)
        tri.decode(lay, pages, staging, q.float(), table, page_start, q_tile, first, cur, cur_len, scale, out=out,
                   workspace=ws, mma=mma)
        _rel(out, want, f"decode out (splits={splits}, mma={mma})")


def test_mma_kernel_feeds_the_tensor_cores_from_registers_on_sm90(tmp_path):
    """The point of the kernel, read from its PTX (``bench/kernels_ptxas.py --mma-only`` compiles it
    for sm_90 here, outside the interpreter): no shared memory, no barrier, 16-byte key loads, one
    ``mma.sync`` per 16 x 8 x 16 block, and no more spill than the Triton kernel's bound."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "mma.json"
    res = subprocess.run([sys.executable, str(root / "bench" / "kernels_ptxas.py"), "--mma-only", "--json", str(out)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        pytest.skip(f"could not compile for sm_90 here: {res.stderr.strip().splitlines()[-1:]}")
    every = json.loads(out.read_text())
    rows = [r for r in every if r["maxnreg"] is None and not r["pipe"]]  # as launched by default
    pipe = [r for r in every if r["pipe"]]
    assert pipe and pipe[0]["stack_bytes"] <= 256 and pipe[0]["ld_v4"] == 0, \
        f"pipelined variant: expected its code bytes through cp.async and no spill, got {pipe}"
    assert [r["tile"] for r in rows] == [64, 128]
    for r in rows:
        where = f"mma kernel at tile {r['tile']}"
        assert r["st_shared"] == 0 and r["bar_sync"] == 0, f"{where}: operands went through shared memory"
        # a tile's key rows: each thread loads tile / 8 rows, 16 bytes at a time
        assert r["ld_v4"] == r["tile"] // 8, f"{where}: key rows not loaded 16 bytes at a time ({r['ld_v4']} v4 loads)"
        # per tile at NQ = 8: keys [G tok x 128 ch] G/2 blocks of 16 x 8 x 16, values [128 ch x G tok] G/2
        assert r["mma"] == r["tile"], f"{where}: {r['mma']} mma.sync per tile, expected {r['tile']}"
        assert r["stack_bytes"] <= 256, f"{where}: spills {r['stack_bytes']} B per thread"
