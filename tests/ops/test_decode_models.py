"""The decode op for head_dim 80/96 and Gemma-2-style soft-capping.

* The reference decode with ``softcap`` against a plain float64 softmax-with-cap over every key a
  row reads (pages dequantized in the model's basis, the staged fp16 first tile and open tile), on
  irregular inputs: sequences of 0..3 completed tiles, open tiles of 1..G tokens, GQA 3, head_dim
  80/96/64, scores large enough that the cap bends them (|s| up to ~4x the cap).
* The dispatch: the Triton kernels index ``tl.arange(0, D)`` and have no cap, so a layer with
  head_dim 80/96 or a cap runs the reference op (one warning per reason) — checked with
  ``KVARN_OPS=triton`` (the kernels would run in the interpreter here).
"""

from __future__ import annotations

import logging

import pytest
import torch

from kvarn.ops import decode as decode_op
from kvarn.ops import store as store_op
from kvarn.ops.decode import reference as ref
from kvarn.ops.layout import PageLayout
from kvarn.ops.store.reference import store_tiles
from kvarn.quant.formats import LayerFormat, TensorFormat

G, H, GROUP = 64, 2, 3


def _layout(d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kf = TensorFormat((4, 2), "channel", "tile", clip=True)
    vf = TensorFormat((3, 16), "token", "static", clip=True)
    return PageLayout(LayerFormat(d, G, kf, vf), torch.randn(H, d, generator=gen) * 0.3,
                      torch.randn(H, d, generator=gen) * 0.3)


def _inputs(lay, n_tiles, gen):
    d = lay.head_dim
    total = sum(n_tiles)
    nblocks = total + 2
    pages = torch.zeros(nblocks, lay.nbytes, dtype=torch.uint8)
    order = (torch.randperm(nblocks - 1, generator=gen) + 1).to(torch.int32)
    table = torch.zeros(len(n_tiles), max(n_tiles) + 1, dtype=torch.int32)
    at = 0
    for b, n in enumerate(n_tiles):
        table[b, :n] = order[at:at + n]
        at += n
    k = torch.randn(total, H, G, d, generator=gen) * (torch.rand(d, generator=gen) * 3 + 0.2)
    v = torch.randn(total, H, G, d, generator=gen)
    store_tiles(lay, pages, k, v, order[:total])
    return pages, table


def _plain(lay, pages, staging, q, table, page_start, q_tile, first, cur, cur_len, scale, cap):
    """float64: gather every key/value row b reads, cap the scores, softmax, weighted sum."""
    k_all, v_all = lay.decode(pages)  # [H, n_blocks, G, D], model basis
    out = []
    for b in range(q.shape[0]):
        ks, vs = [], []
        if int(first[b]) >= 0:
            ks.append(staging[int(first[b]), 0].double())
            vs.append(staging[int(first[b]), 1].double())
        for t in range(int(page_start[b]), int(q_tile[b])):
            blk = int(table[b, t])
            ks.append(k_all[:, blk].double())
            vs.append(v_all[:, blk].double())
        n = int(cur_len[b])
        ks.append(staging[int(cur[b]), 0, :, :n].double())
        vs.append(staging[int(cur[b]), 1, :, :n].double())
        k, v = torch.cat(ks, 1), torch.cat(vs, 1)  # [H, N, D]
        kk, vv = k.repeat_interleave(GROUP, 0), v.repeat_interleave(GROUP, 0)
        s = torch.einsum("hd,hnd->hn", q[b].double(), kk) * scale
        if cap:
            s = cap * torch.tanh(s / cap)
        out.append(torch.einsum("hn,hnd->hd", torch.softmax(s, -1), vv))
    return torch.stack(out)


def _case(d, seed):
    gen = torch.Generator().manual_seed(seed)
    lay = _layout(d, seed)
    n_tiles = [3, 0, 1, 2]
    pages, table = _inputs(lay, n_tiles, gen)
    b = len(n_tiles)
    staging = (torch.randn(2 * b + 1, 2, H, G, d, generator=gen) * 2).half()
    q = torch.randn(b, H * GROUP, d, generator=gen) * 4  # |scores| of several units: the cap matters
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    meta = dict(block_table=table, page_start=i32([1, 0, 0, 1]), q_tile=i32(n_tiles), first_slot=i32([0, -1, -1, 2]),
                cur_slot=i32([1, 3, 4, 5]), cur_len=i32([7, 1, G - 1, G]))
    return lay, pages, staging, q, meta


@pytest.mark.parametrize("d", [80, 96, 64])
@pytest.mark.parametrize("cap", [None, 1.5, 30.0])
def test_reference_decode_with_softcap_matches_plain_softmax(d, cap):
    lay, pages, staging, q, m = _case(d, seed=d + int(cap or 0))
    scale = d ** -0.5
    got = ref.decode(lay, pages, staging, q, m["block_table"], m["page_start"], m["q_tile"], m["first_slot"],
                     m["cur_slot"], m["cur_len"], scale, softcap=cap)
    want = _plain(lay, pages, staging, q, m["block_table"], m["page_start"], m["q_tile"], m["first_slot"],
                  m["cur_slot"], m["cur_len"], scale, cap)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 1e-5, f"decode out (D={d}, cap={cap}): relative error {err:.2e}"
    if cap == 1.5:  # not vacuous: the cap changes the result
        plain = _plain(lay, pages, staging, q, m["block_table"], m["page_start"], m["q_tile"], m["first_slot"],
                       m["cur_slot"], m["cur_len"], scale, None)
        assert ((plain - want).norm() / want.norm()).item() > 0.05


def test_paged_attention_prefill_rows_with_softcap():
    """Several query rows per sequence (prefill continuation), each over the tiles below its own."""
    lay, pages, _, _, m = _case(80, seed=11)
    gen = torch.Generator().manual_seed(12)
    q_seq = torch.tensor([0, 0, 0, 3, 3])
    q_tile = torch.tensor([2, 3, 3, 1, 2], dtype=torch.int32)
    page_start = torch.tensor([1, 0, 0, 0], dtype=torch.int32)
    q = torch.randn(5, H * GROUP, 80, generator=gen) * 4
    cap, scale = 2.0, 80 ** -0.5
    o, lse = ref.paged_attention(lay, pages, q, q_seq, q_tile, page_start, m["block_table"], scale, softcap=cap)
    k_all, v_all = lay.decode(pages)
    for r in range(5):
        b = int(q_seq[r])
        blocks = [int(m["block_table"][b, t]) for t in range(int(page_start[b]), int(q_tile[r]))]
        k = torch.cat([k_all[:, blk] for blk in blocks], 1).double().repeat_interleave(GROUP, 0)
        v = torch.cat([v_all[:, blk] for blk in blocks], 1).double().repeat_interleave(GROUP, 0)
        s = cap * torch.tanh(torch.einsum("hd,hnd->hn", q[r].double(), k) * scale / cap)
        want = torch.einsum("hn,hnd->hd", torch.softmax(s, -1), v)
        torch.testing.assert_close(o[r].double(), want, rtol=1e-5, atol=1e-5, msg=f"row {r} out")
        torch.testing.assert_close(lse[r].double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5, msg=f"row {r} lse")


@pytest.mark.parametrize("d,cap", [(80, None), (96, None), (64, 20.0)])
def test_triton_dispatch_falls_back_to_the_reference(d, cap, monkeypatch, caplog):
    """What the Triton kernels cannot run goes to the reference op, with one warning line."""
    from kvarn import ops

    ops._warn_once.cache_clear()
    monkeypatch.setenv("KVARN_OPS", "triton")
    lay, pages, staging, q, m = _case(d, seed=3)
    scale = d ** -0.5
    with caplog.at_level(logging.WARNING, logger="kvarn.ops"):
        got = decode_op.decode(lay, pages, staging, q, m["block_table"], m["page_start"], m["q_tile"],
                               m["first_slot"], m["cur_slot"], m["cur_len"], scale, softcap=cap)
        got2 = decode_op.decode(lay, pages, staging, q, m["block_table"], m["page_start"], m["q_tile"],
                                m["first_slot"], m["cur_slot"], m["cur_len"], scale, softcap=cap)
        if cap is None:  # the store has no cap; at D=64 it would run the Triton kernel (slow in the interpreter)
            pages2 = torch.zeros_like(pages)
            gen = torch.Generator().manual_seed(0)
            k, v = torch.randn(2, H, G, d, generator=gen), torch.randn(2, H, G, d, generator=gen)
            store_op.store_tiles(lay, pages2, k, v, torch.tensor([1, 2]))
            expect = torch.zeros_like(pages)
            store_tiles(lay, expect, k, v, torch.tensor([1, 2]))
            assert torch.equal(pages2, expect)
    want = ref.decode(lay, pages, staging, q, m["block_table"], m["page_start"], m["q_tile"], m["first_slot"],
                      m["cur_slot"], m["cur_len"], scale, softcap=cap)
    assert torch.equal(got, want) and torch.equal(got2, want)
    lines = [r.getMessage() for r in caplog.records]
    reason = f"head_dim {d}" if cap is None else "soft-capping"
    hits = [x for x in lines if "Triton decode kernel" in x and reason in x]
    assert len(hits) == 1 and "\n" not in hits[0], lines  # once per process and reason, one line
    if cap is None:
        assert sum("Triton store kernel" in x for x in lines) == 1, lines
