"""Tensor parallelism on the calibration side: a recipe balanced for a TP size (real model, real
text) records it, and ``inspect`` shows each rank's bytes per token; bad sizes fail in one line
before any weights load."""

from __future__ import annotations

import pytest

from kvarn import api
from kvarn.errors import KvarnError
from kvarn.recipe import Recipe


def one_line(msg: str) -> bool:
    return "\n" not in msg.strip() and len(msg.strip()) > 0


def test_calibrate_balanced_for_tp_records_it(smollm, tmp_path):
    """SmolLM2 has 3 KV heads: TP 3 puts one head on each rank; the balanced recipe's ranks hold
    equal bytes per token up to one width step, where a plain allocation's need not."""
    out = tmp_path / "tp3.safetensors"
    recipe, report = api.calibrate(calib="wiki:first", num_samples=1, seq_len=384, avg_bits=3.0, output=out,
                                   progress=False, loaded=smollm, tp_size=3)
    r = Recipe.load(out)
    assert r.budget["tp_sizes"] == [3] and report.budget["tp_sizes"] == [3]
    s = api.inspect(out)
    ranks = s["bytes_per_token_per_rank"]["3"]
    assert len(ranks) == 3 and abs(sum(ranks) - s["bytes_per_token"]) < 1e-3 * s["bytes_per_token"]
    # every layer's ranks within one width step (2 -> 3 or 3 -> 4 bits of one tensor: 8 bytes per
    # token at head_dim 64; 4 -> 8: 32; 8 -> 16: 64), so the padded pages waste little
    from kvarn.parallel import rank_kv_heads
    from kvarn.quant.formats import tile_bytes
    from kvarn.runtime.paged import CacheSource

    src = CacheSource("r", tuple(r.layer_formats()), r.keep_first_tile)
    shards = [src.shard(rank_kv_heads(3, 3, k)) for k in range(3)]
    for l in range(r.num_layers):
        b = [tile_bytes(sh.formats[l]) / r.tile for sh in shards]
        assert max(b) - min(b) <= 64, f"layer {l}: ranks hold {b} bytes per token"
    padding = 1 - sum(ranks) / (3 * s["tp_padded_bytes_per_token"]["3"])
    text = api.format_inspect(s)
    assert "tensor-parallel 3" in text and "balanced by calibration" in text and padding < 0.1, (padding, text)


def test_tp_size_that_cannot_split_the_heads_fails_before_loading(tmp_path, monkeypatch):
    import kvarn.models as models

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr(models, "load_model", no_weights)
    for bad in (2, 0):
        with pytest.raises(KvarnError) as e:
            api.calibrate(calib="wiki:first", num_samples=1, seq_len=384, output=tmp_path / "x.safetensors",
                          progress=False, tp_size=bad)
        assert one_line(str(e.value)) and "--tp-size" in str(e.value), str(e.value)
