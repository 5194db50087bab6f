"""The paged cache (what the vLLM backend runs) against the reference reader, without vLLM.

A toy engine hands out blocks, feeds a sequence in chunks (prefill chunks, then one token at a
time) and checks every step's attention against ``SchemeAttention`` on the whole sequence: both
read completed tiles quantized and the first/own tile in fp16, so they agree to float error.
Sizes are irregular on purpose (T not a multiple of the tile, chunks that straddle tiles).
"""

from __future__ import annotations

import pytest
import torch

from kvarn.quant.formats import LayerFormat, TensorFormat, tile_bytes
from kvarn.quant.scheme import CacheScheme, SchemeAttention
from kvarn.ops.layout import PageLayout
from kvarn.runtime.decode_graphs import DecodeGraphs
from kvarn.runtime.paged import CacheSource, StagingTable, attend_layer, staging_slots

G, H, HQ = 64, 2, 4


def _format(d: int, kbits=(4, 2), vbits=(2, 8), v_norm="static") -> LayerFormat:
    return LayerFormat(d, G, TensorFormat(tuple(kbits), "channel", "tile", clip=True),
                       TensorFormat(tuple(vbits), "token", v_norm, clip=True))


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("v_norm", ["static", "tile"])
def test_layout_round_trip_matches_codec(d, v_norm):
    torch.manual_seed(0)
    fmt = _format(d, kbits=(4, 16), vbits=(3, 2), v_norm=v_norm)
    k_prior, v_prior = torch.randn(H, d) * 0.3, torch.randn(H, d) * 0.3
    lay = PageLayout(fmt, k_prior, v_prior)
    assert lay.nbytes == tile_bytes(fmt)
    k, v = torch.randn(H, 3, G, d), torch.randn(H, 3, G, d)
    k_hat, v_hat = lay.decode(lay.encode(k, v))
    from kvarn.quant.codec import fake_quantize_tiles

    for h in range(H):
        ref_k = fake_quantize_tiles(k[h], fmt.k, fmt.k.bits[h], k_prior[h][None, :])
        ref_v = fake_quantize_tiles(v[h], fmt.v, fmt.v.bits[h], v_prior[h][None, :])
        torch.testing.assert_close(k_hat[h], ref_k, rtol=1e-5, atol=1e-5, msg=f"K head {h}")
        torch.testing.assert_close(v_hat[h], ref_v, rtol=1e-5, atol=1e-5, msg=f"V head {h}")


def _run(source: CacheSource, seq_chunks: list[list[int]], T: int, d: int, seed=0, shuffle_blocks=True,
         fp16_inputs=True, device="cpu", prefill="tiled", dtype=torch.float32, softcap=None, graphs=False):
    """Feed len(seq_chunks) sequences of T tokens; chunk lists give query lengths per step (the
    engine's tensors on ``device``; the reference always on the CPU). ``prefill="raw"``: the
    reference is ``_raw_reference``. ``softcap``: returns (out, the capped reference, the uncapped one).
    ``graphs``: decode rows through ``DecodeGraphs`` (captured on CUDA, its static path on the CPU)."""
    torch.manual_seed(seed)
    n = len(seq_chunks)
    q = torch.randn(n, T, HQ, d)
    k = torch.randn(n, T, H, d) * torch.linspace(0.5, 3, d)  # channel outliers, like real keys
    v = torch.randn(n, T, H, d)
    if fp16_inputs:  # staging keeps fp16: with fp16-exact inputs nothing is lost before encoding
        k, v = k.half().float(), v.half().float()
    if dtype != torch.float32:  # the reference sees the engine's inputs (a bf16 rounding flips codes)
        q, k, v = q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float()
    nblocks = n * (-(-T // G)) + 1
    order = torch.randperm(nblocks - 1) + 1 if shuffle_blocks else torch.arange(1, nblocks)
    blocks = [order[i * (-(-T // G)):(i + 1) * (-(-T // G))].tolist() for i in range(n)]
    lay = source.layout(0)
    pages = torch.zeros(nblocks, lay.nbytes + 6, dtype=torch.uint8, device=device)  # padded pages (even size: fp16 fields)
    table = StagingTable(staging_slots(n, source.keep_first_tile), G, source.keep_first_tile)
    staging = torch.zeros(table.num_slots + 1, 2, H, G, d, dtype=torch.float16, device=device)  # + a scratch slot
    dg = DecodeGraphs(-(-T // G) + 3, HQ, H, d, dtype, device, scratch_slot=table.num_slots) if graphs else None
    out = torch.zeros(n, T, HQ, d)
    pos = [0] * n
    for step in range(max(len(c) for c in seq_chunks)):
        seqs, rows, at = [], [], 0
        for i, chunks in enumerate(seq_chunks):
            if step >= len(chunks):
                continue
            ql = chunks[step]
            seqs.append((at, at + ql, pos[i], pos[i] + ql, blocks[i]))
            rows.append((i, pos[i], pos[i] + ql))
            at += ql
            pos[i] += ql
        steps = table.plan(seqs)
        qb = torch.cat([q[i, a:b] for i, a, b in rows]).to(device, dtype)
        kb = torch.cat([k[i, a:b] for i, a, b in rows]).to(device, dtype)
        vb = torch.cat([v[i, a:b] for i, a, b in rows]).to(device, dtype)
        ob = torch.zeros_like(qb)
        attend_layer(lay, source.keep_first_tile, pages, staging, steps, qb, kb, vb, d ** -0.5, ob, prefill=prefill,
                     softcap=softcap, graphs=dg)
        ob = ob.float().cpu()
        at = 0
        for i, a, b in rows:
            out[i, a:b] = ob[at:at + b - a]
            at += b - a
    if prefill == "raw":
        return out, _raw_reference(source, seq_chunks, q, k, v, d, softcap)
    scheme = CacheScheme("t", list(source.formats), source.keep_first_tile, source.k_log_std, source.v_log_std)
    causal = torch.full((T, T), float("-inf")).triu(1)
    refs = [SchemeAttention(scheme).attend] + ([] if softcap is None else [_capped_reference(scheme, softcap)])
    refs = [torch.stack([
        attend(0, q[i].transpose(0, 1)[None], k[i].transpose(0, 1)[None],
               v[i].transpose(0, 1)[None], causal, d ** -0.5)[0].transpose(0, 1)
        for i in range(n)
    ]) for attend in refs]
    return (out, refs[0]) if softcap is None else (out, refs[1], refs[0])


def _capped_reference(scheme, softcap):
    """``SchemeAttention.attend`` with soft-capped scores (explicit-score reference attention)."""
    from kvarn.quant.attention import mixed_attention_ref, quantized_read_mask
    from kvarn.quant.codec import fake_quantize_sequence

    def attend(layer, q, k, v, bias, scaling):
        fmt = scheme.layers[layer]
        k16, v16 = k.half().float(), v.half().float()
        k_hat = fake_quantize_sequence(k16, fmt.k, fmt.tile, scheme.keep_first_tile, scheme.k_log_std[layer])
        v_hat = fake_quantize_sequence(v16, fmt.v, fmt.tile, scheme.keep_first_tile, scheme.v_log_std[layer])
        pos = torch.arange(k.shape[-2])
        mask = quantized_read_mask(pos, pos, fmt.tile, scheme.keep_first_tile)
        return mixed_attention_ref(q, k16, v16, k_hat, v_hat, mask, bias, scaling, softcap)

    return attend


def _raw_reference(source: CacheSource, seq_chunks, q, k, v, d, softcap=None):
    """The serving read of prefill (``prefill="raw"``), computed independently with explicit scores:
    a query of a chunk starting at ``a`` reads tiles completed before the chunk (below ``a // G``)
    quantized, except the first if kept, and every other key up to itself exactly (fp16)."""
    from kvarn.quant.attention import mixed_attention_ref
    from kvarn.quant.codec import fake_quantize_sequence

    fmt = source.formats[0]
    outs = []
    for i, chunks in enumerate(seq_chunks):
        kt, vt = k[i].transpose(0, 1)[None], v[i].transpose(0, 1)[None]  # [1, H, T, D]
        k16, v16 = kt.half().float(), vt.half().float()
        k_hat = fake_quantize_sequence(k16, fmt.k, G, source.keep_first_tile, source.k_log_std[0])
        v_hat = fake_quantize_sequence(v16, fmt.v, G, source.keep_first_tile, source.v_log_std[0])
        T = kt.shape[2]
        pos = torch.arange(T)
        rows, a = [], 0
        for n in chunks:
            qp = pos[a:a + n]
            quant = (pos[None, :] // G < a // G) & (pos[None, :] // G >= (1 if source.keep_first_tile else 0))
            quant = quant.expand(n, T)
            bias = torch.where(pos[None, :] <= qp[:, None], 0.0, float("-inf"))
            rows.append(mixed_attention_ref(q[i, a:a + n].transpose(0, 1)[None], k16, v16, k_hat, v_hat, quant,
                                            bias, d ** -0.5, softcap)[0].transpose(0, 1))
            a += n
        outs.append(torch.cat(rows))
    return torch.stack(outs)


@pytest.mark.parametrize("keep_first", [True, False])
def test_raw_prefill_reads_only_the_cached_past(keep_first):
    """``prefill="raw"`` (the GPU serving read): a chunk attends over its own raw keys (causal;
    FlashAttention on CUDA) plus what was cached before it, merged by log-sum-exp; decode rows
    after it read as always. Chunks start mid-tile, end on and across tile edges; one sequence
    is a single whole prefill (FlashAttention alone)."""
    torch.manual_seed(4)
    d = 64
    src = CacheSource("t", (_format(d, kbits=(3, 4), vbits=(2, 4)),), keep_first, torch.randn(1, H, d) * 0.2,
                      torch.randn(1, H, d) * 0.2)
    T = 3 * G + 29
    chunks = [[T - 4] + [1] * 4, [50, 14, 64, 1, 70] + [1] * (T - 199), [G + 3, 2 * G - 3] + [1] * 29]
    cuda = torch.cuda.is_available()  # compiled, in bf16 as vLLM runs it: FlashAttention + the Triton ops
    out, ref = _run(src, chunks, T, d, prefill="raw", device="cuda" if cuda else "cpu",
                    dtype=torch.bfloat16 if cuda else torch.float32)
    err = ((out - ref).norm() / ref.norm()).item() if cuda else (out - ref).abs().max().item()
    assert err < (2e-2 if cuda else 2e-4), f"raw prefill vs the reference: error {err:.2e}"
    # the rule differs from the tiled one where a chunk spans tiles: reading its own tiles raw matters
    tiled, _ = _run(src, chunks, T, d)
    assert (tiled - out).abs().max().item() > 1e-3, "raw and tiled prefill agree: the test cannot tell them apart"


@pytest.mark.parametrize("keep_first", [True, False])
@pytest.mark.parametrize("d", [64, 128])
def test_chunked_prefill_and_decode_match_reference(keep_first, d):
    torch.manual_seed(1)
    fmt = _format(d)
    src = CacheSource("t", (fmt,), keep_first, torch.randn(1, H, d) * 0.2, torch.randn(1, H, d) * 0.2)
    T = 3 * G + 37
    chunks = [
        [T - 5] + [1] * 5,                       # one prefill, then decode
        [50, 14, 64, 1, 70] + [1] * (T - 199),   # chunks ending on and across tile edges
        [1] * T,                                 # token by token
    ]
    out, ref = _run(src, chunks, T, d)
    err = (out - ref).abs().max().item()
    assert err < 2e-4, f"max |paged - reference| = {err:.2e}"


def test_softcap_and_head_dim_96_prefill_and_decode_match_capped_reference():
    """head_dim 96 and Gemma-2-style soft-capping (cap 1.0 against scores of a few units: it bends
    most of them) through prefill chunks and decode, against the reference with capped scores."""
    torch.manual_seed(4)
    d = 96
    src = CacheSource("t", (_format(d),), True, torch.randn(1, H, d) * 0.2, torch.randn(1, H, d) * 0.2)
    T = 2 * G + 29
    chunks = [[T - 4] + [1] * 4, [50, 78, 1] + [1] * (T - 129)]
    out, ref, uncapped = _run(src, chunks, T, d, softcap=1.0)
    err = (out - ref).abs().max().item()
    assert err < 2e-4, f"max |paged - capped reference| = {err:.2e}"
    assert (uncapped - ref).abs().max().item() > 100 * err, "test is vacuous: the cap changed nothing"


def test_raw_prefill_with_softcap_and_head_dim_80():
    """The serving read of prefill (``prefill="raw"``) with a cap, at head_dim 80."""
    torch.manual_seed(5)
    d = 80
    src = CacheSource("t", (_format(d),), True, torch.randn(1, H, d) * 0.2, torch.randn(1, H, d) * 0.2)
    T = 2 * G + 29
    chunks = [[70, 50, 1] + [1] * (T - 121), [T]]  # chunks start mid-tile and end across tile edges
    out, ref = _run(src, chunks, T, d, prefill="raw", softcap=1.0)
    err = (out - ref).abs().max().item()
    assert err < 2e-4, f"max |raw paged - capped raw reference| = {err:.2e}"


def test_chunked_prefill_and_decode_with_triton_ops(monkeypatch):
    """The same engine steps through the Triton ops (the interpreter on CPU, compiled on CUDA).

    The decode kernel feeds fp16 operands to its dots (scaled query, probabilities, codes), so it
    agrees with the float32 reference to ~5e-4 relative rather than to float32 rounding."""
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setenv("KVARN_OPS", "triton")
    torch.manual_seed(2)
    d = 64
    src = CacheSource("t", (_format(d, kbits=(3, 4), vbits=(2, 16)),), True, torch.randn(1, H, d) * 0.2,
                      torch.randn(1, H, d) * 0.2)
    T = 2 * G + 21
    chunks = [[T - 3] + [1] * 3, [70, 58, 1] + [1] * (T - 129)]
    out, ref = _run(src, chunks, T, d, device="cuda" if torch.cuda.is_available() else "cpu")
    rel = ((out - ref).norm() / ref.norm()).item()
    assert not torch.isnan(out).any() and rel < 3e-3, f"triton ops: relative error {rel:.2e} vs the reference"


def test_decode_rows_take_the_batched_path(monkeypatch):
    """Single-token rows never reach the per-sequence path, and the batched path alone (every row a
    decode row from the second step on) still matches the reference."""
    import kvarn.runtime.paged as paged

    general_rows = []
    real = paged._stage

    def spy(layout, keep, pages, staging, steps, *args):
        general_rows.extend(st.q_end - st.q_start for st in steps if not st.dummy)
        return real(layout, keep, pages, staging, steps, *args)

    monkeypatch.setattr(paged, "_stage", spy)  # the per-sequence path starts here
    torch.manual_seed(3)
    d = 64
    src = CacheSource("t", (_format(d),), True, torch.randn(1, H, d) * 0.2, torch.randn(1, H, d) * 0.2)
    T = 2 * G + 9
    out, ref = _run(src, [[G - 1] + [1] * (T - G + 1), [1] * T], T, d)
    assert general_rows == [G - 1], f"rows that took the per-sequence path: {general_rows}"
    err = (out - ref).abs().max().item()
    assert err < 2e-4, f"max |batched decode - reference| = {err:.2e}"


def test_rank_kv_heads_follow_vllms_split():
    from kvarn.parallel import rank_kv_heads

    assert [rank_kv_heads(8, 2, r) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [rank_kv_heads(8, 8, r) for r in range(8)] == [[r] for r in range(8)]
    assert [rank_kv_heads(2, 4, r) for r in range(4)] == [[0], [0], [1], [1]]  # replicated: TP > KV heads
    for bad in ((3, 2, 0), (2, 3, 0), (8, 2, 2)):
        with pytest.raises(ValueError):
            rank_kv_heads(*bad)


def test_shard_holds_the_ranks_heads():
    """A rank's source (``CacheSource.shard``) encodes and decodes its heads exactly as the whole
    source does those heads: widths and priors follow the heads; bytes per rank add up to the
    whole (no replication) and differ where the recipe's widths differ between ranks."""
    from kvarn.runtime.paged import rank_bytes_per_token

    torch.manual_seed(5)
    d, heads = 64, 4
    fmt = LayerFormat(d, G, TensorFormat((4, 2, 3, 16), "channel", "tile", clip=True),
                      TensorFormat((2, 8, 4, 2), "token", "static", clip=True))
    kp, vp = torch.randn(2, heads, d) * 0.3, torch.randn(2, heads, d) * 0.3
    src = CacheSource("t", (fmt, fmt), True, kp, vp)
    k, v = torch.randn(heads, 2, G, d), torch.randn(heads, 2, G, d)
    full_k, full_v = src.layout(1).decode(src.layout(1).encode(k, v))
    for sel in ([2, 3], [0, 1], [3]):
        part = src.shard(sel)
        assert part.formats[1].k.bits == tuple(fmt.k.bits[h] for h in sel)
        pk, pv = part.layout(1).decode(part.layout(1).encode(k[sel], v[sel]))
        torch.testing.assert_close(pk, full_k[sel], rtol=1e-5, atol=1e-5, msg=f"K of heads {sel}")
        torch.testing.assert_close(pv, full_v[sel], rtol=1e-5, atol=1e-5, msg=f"V of heads {sel}")
    per_rank = rank_bytes_per_token(src, 2)
    whole = sum(tile_bytes(f) for f in src.formats) / G
    assert abs(sum(per_rank) - whole) < 1e-6 * whole and per_rank[0] != per_rank[1], per_rank


@pytest.mark.parametrize("keep_first", [True, False])
def test_decode_graphs_path_equals_the_plain_path(keep_first):
    """Decode rows through ``DecodeGraphs`` (static buffers of a bucket, padded rows, one graph per
    layer on CUDA) give what the plain path gives: bit for bit on the CPU (the same ops on padded
    buffers), within float noise on CUDA (the bucket's split count differs). 3 and 5 sequences: the
    buckets 4 and 8 carry padded rows; decode rows interleave with prefill chunks."""
    torch.manual_seed(7)
    d = 64
    src = CacheSource("t", (_format(d, kbits=(3, 4), vbits=(2, 4)),), keep_first, torch.randn(1, H, d) * 0.2,
                      torch.randn(1, H, d) * 0.2)
    T = 2 * G + 21
    for chunks in ([[T - 40] + [1] * 40, [30, 100] + [1] * (T - 130), [1] * T],
                   [[T - 9] + [1] * 9, [1] * T, [G] + [1] * (T - G), [7, G - 7] + [1] * (T - G), [T - 1, 1]]):
        cuda = torch.cuda.is_available()
        kw = dict(device="cuda" if cuda else "cpu", dtype=torch.bfloat16 if cuda else torch.float32)
        plain, _ = _run(src, chunks, T, d, **kw)
        graphed, _ = _run(src, chunks, T, d, graphs=True, **kw)
        err = (graphed - plain).abs().max().item()
        assert err <= (2e-2 if cuda else 0.0), f"{len(chunks)} sequences: graphs vs plain path differ by {err:.2e}"
