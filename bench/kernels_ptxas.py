"""Registers and spills of kvarn's Triton kernels for the H200 (sm_90), compiled here: no GPU needed.

Compiles ``_paged_kernel`` (decode) for each (K, V) head group of the benchmark formats and a few
configurations, and ``_store_kernel``, with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``,
then runs the ptxas that ships in the triton wheel with ``-v``. Spilled registers live in local
memory (an HBM round trip per use): a decode kernel that spills cannot run near the bandwidth
limit, so this is the first thing to read before spending device time.

    python bench/kernels_ptxas.py [--json PATH] [--check]

``--check`` exits 1 when a default decode configuration spills more than ``SPILL_LIMIT`` bytes per
thread (tests/ops runs it). Not zero: the fastest configuration measured on the H200 (k4v2 at 2
warps, 2026-12-02) spills 192 B and beat the spill-free 4-warp one by 4%; the spill that cost 2x
was 3.2 KB.
Must run without ``TRITON_INTERPRET`` (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("bench/kernels_ptxas.py compiles kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvarn.ops.decode import triton as dec  # noqa: E402
from kvarn.ops.layout import PageLayout  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SPILL_LIMIT = 256  # bytes of stack per thread (see --check)


def _signature(fn, consts: dict, pointers: dict, floats=(), ints: dict | None = None) -> ASTSource:
    """The kernel as a real launch specializes it: every pointer 16-byte aligned (torch allocations
    are), integers given in ``ints`` marked divisible by 16 where their value is (a value of 1 would
    become a constant: pass it in ``consts``). Without these hints loads are not vectorized and the
    loop is not software-pipelined, so registers and spills read here would not be the GPU's."""
    sig, attrs = {}, {}
    ints = ints or {}
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in consts else pointers.get(name, "fp32" if name in floats else "i32")
        if name in pointers or (name in ints and ints[name] % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                     attrs=attrs)


def ptx_counts(ptx: str) -> dict:
    """Instructions that say where a decode kernel's operands travel (shared memory, barriers) and
    how it loads (16-byte vector loads) and multiplies (``mma.sync`` blocks)."""
    words = {"st_shared": "st.shared", "bar_sync": "bar.sync", "ld_v4": "ld.global.v4.b32",
             "mma": "mma.sync.aligned.m16n8k16"}
    return {k: len(re.findall(re.escape(w), ptx)) for k, w in words.items()}


def ptxas_usage(kernel) -> dict:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(kernel.asm["ptx"])
        res = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = res.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "stack_bytes": num(r"(\d+) bytes stack frame"),
            "spill_store_bytes": num(r"(\d+) bytes spill stores"), "spill_load_bytes": num(r"(\d+) bytes spill loads")}


DECODE_PTRS = {"q_ptr": "*fp32", "ws_o": "*fp32", "ws_lse": "*fp32", "u8": "*u8", "f16": "*fp16", "offsets": "*i32",
               "heads": "*i32", "v_static": "*fp32", "had": "*fp32", "block_table": "*i32", "q_tile": "*i32",
               "page_start": "*i32", "row_seq": "*i32", "row_tok0": "*i32", "row_ntok": "*i32"}


def decode_usage(layout: PageLayout, group=4, bt=None, num_warps=None, num_stages=None, cvt=2, prefetch=None,
                 batch=64):
    """One row per (K, V) head group of ``layout`` at a decode configuration (None: the op's default)."""
    bt, num_warps, num_stages, prefetch = dec._config(layout, bt, num_warps, num_stages, prefetch)
    rows = []
    for kb, vb, _ in layout.head_groups():
        group_consts, warps, _ = dec.group_launch(layout, kb, vb, num_warps)  # as the decode op launches it
        bt_ = bt
        consts = dict(HQ=group * layout.num_kv_heads, GROUP=group, TOKS=1, M=dec._m_rows(group), D=layout.head_dim,
                      G=layout.tile, BT=bt_, ROWS_ARE_SEQS=True, CVT=cvt,
                      PREFETCH=bool(prefetch), **group_consts)
        hq, d = group * layout.num_kv_heads, layout.head_dim
        ints = dict(stride_qt=hq * d, stride_qh=d, ws_stride_s=batch * hq * d, page_stride=layout.nbytes,
                    bt_stride=64, num_kv_heads=layout.num_kv_heads, SPLITS=2)  # B x 8k tokens, 2 splits
        kernel = triton.compile(_signature(dec._paged_kernel, consts, DECODE_PTRS, floats=("qscale",), ints=ints),
                                target=TARGET,
                                options={"num_warps": warps, "num_stages": num_stages})
        rows.append({"kernel": "decode", "k_bits": kb, "v_bits": vb, "bt": bt_, "num_warps": warps,
                     "cvt": cvt, "prefetch": prefetch, **ptxas_usage(kernel)})
    return rows


def mma_usage(tile: int, group: int = 4, k_norm: bool = True, v_norm: int = 1, batch: int = 64,
              maxnreg: int | None = None, pipe: bool = False) -> dict:
    """``kvarn.ops.decode.mma._mma_kernel`` (Gluon, one warp) for the Llama-3.1-8B shape, K4V2."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from kvarn.ops.decode import mma

    fn = mma._mma_kernel
    consts = dict(HQ=32, GROUP=group, NQ=max(8, triton.next_power_of_2(group)), G=tile, K_NORM=k_norm,
                  V_NORM=v_norm, PIPE=pipe)
    from kernels_gpu import FORMATS

    fmt = FORMATS["k4v2"]
    page_stride = PageLayout(type(fmt)(fmt.head_dim, tile, fmt.k, fmt.v), torch.zeros(8, 128), torch.zeros(8, 128)).nbytes
    ints = dict(stride_qt=32 * 128, stride_qh=128, ws_stride_s=batch * 32 * 128, page_stride=page_stride, bt_stride=64)
    base = _signature(fn, consts, DECODE_PTRS, floats=("qscale",), ints=ints)
    src = GluonASTSource(fn=fn, signature=base.signature, constexprs=base.constants, attrs=base.attrs)
    kernel = triton.compile(src, target=TARGET, options={"num_warps": 1, **({"maxnreg": maxnreg} if maxnreg else {})})
    return {"kernel": "decode-mma", "maxnreg": maxnreg, "pipe": pipe, "format": "k4v2", "k_bits": 4, "v_bits": 2, "tile": tile, "bt": tile // 4,
            "num_warps": 1, "cvt": 2,
            "prefetch": False, **ptxas_usage(kernel), **ptx_counts(kernel.asm["ptx"])}


def store_usage(layout: PageLayout, name: str):
    """Both launches of the store (prepare, quantize), as ``store_tiles`` makes them."""
    from kvarn.ops.store import triton as st

    ptrs = {"u8": "*u8", "f16": "*fp16", "k_ptr": "*bf16", "v_ptr": "*bf16", "block_ids": "*i32", "bits_tab": "*i32",
            "offs_tab": "*i32", "had_ptr": "*fp32", "k_prior": "*fp32", "v_prior": "*fp32", "v_static": "*fp32",
            "ratios_ptr": "*fp32", "ws_ptr": "*fp32"}
    h, g, d = layout.num_kv_heads, layout.tile, layout.head_dim
    ints = dict(page_stride=layout.nbytes, page_stride16=layout.nbytes // 2, sk_n=h * g * d, sk_h=g * d, sk_g=d,
                sv_n=h * g * d, sv_h=g * d, sv_g=d, H=h)
    rows = []
    for phase, warps in ((1, st._num_warps(g, d)), (2, 4)):
        meta = dict(st._tables(layout, torch.device("cpu")).meta, PHASE=phase, NP=st.store_parts(g, d))
        meta.update(sk_d=1, sv_d=1)  # contiguous [n, H, G, D] inputs: a stride of 1 is a constant in a launch
        kernel = triton.compile(_signature(st._store_kernel, meta, ptrs, ints=ints), target=TARGET,
                                options={"num_warps": warps, "num_stages": 1, "enable_fp_fusion": False})
        rows.append({"kernel": f"store phase {phase}", "format": name, **ptxas_usage(kernel)})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--check", action="store_true",
                    help=f"exit 1 if a default decode configuration spills more than {SPILL_LIMIT} B per thread")
    ap.add_argument("--no-store", action="store_true")
    ap.add_argument("--mma-only", action="store_true", help="only the Gluon mma decode kernel (tiles 64/128)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kernels_gpu import FORMATS  # the benchmark's formats (Llama-3.1-8B shape)

    prior = torch.zeros(8, 128)
    rows = [{"default": tile == 128, **mma_usage(tile)} for tile in (64, 128)]
    if not args.check:
        rows += [{"default": False, **mma_usage(128, maxnreg=r)} for r in (128, 168)]
        rows += [{"default": False, **mma_usage(128, pipe=True)}]
    for name, fmt in ({} if args.mma_only else FORMATS).items():
        lay = PageLayout(fmt, prior, prior)
        for r in decode_usage(lay):
            rows.append({"format": name, "default": True, **r})
        if not args.check:
            for cfg in (dict(prefetch=False), dict(cvt=1), dict(bt=128, num_warps=4), dict(num_warps=4)):
                for r in decode_usage(lay, **cfg):
                    rows.append({"format": name, "default": False, **r})
        if not args.no_store and not args.check:
            rows.extend(store_usage(lay, name))
    print("| kernel | format | K/V bits | config | registers | stack B | spill st/ld B |\n|---|---|---|---|---|---|---|")
    for r in rows:
        cfg = "" if r["kernel"].startswith("store") else f"bt {r['bt']}, {r['num_warps']} warps, cvt {r['cvt']}" + \
            (", prefetch" if r.get("prefetch") else "")
        bits = f"{r.get('k_bits', '')}/{r.get('v_bits', '')}" if r["kernel"].startswith("decode") else "all"
        print(f"| {r['kernel']} | {r['format']} | {bits} | {cfg} | {r['registers']} | {r['stack_bytes']} | "
              f"{r['spill_store_bytes']}/{r['spill_load_bytes']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.check:
        bad = [r for r in rows if r["kernel"].startswith("decode") and r["default"] and r["stack_bytes"] > SPILL_LIMIT]
        bad += [r for r in rows if r["kernel"] == "decode-mma" and (r["st_shared"] or r["bar_sync"])]
        if bad:
            print(f"spilling default decode configurations: {bad}")
            sys.exit(1)


if __name__ == "__main__":
    main()
