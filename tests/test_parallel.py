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


def test_calibrate_a_model_split_over_devices_equals_one_device(smollm, tmp_path):
    """A model dispatched by accelerate (``device_map``: the first layers on the CPU, the last ones
    and the head offloaded to disk, their weights on the meta device until a hook loads them) is
    calibrated where it is, as llm-compressor users pass one: same widths, priors within float32
    noise. The capture's sums stay on the first layer's device; nothing per token is kept."""
    accelerate = pytest.importorskip("accelerate", reason="accelerate is not installed")
    import torch

    from kvarn.models import load_model

    args = dict(calib="wiki:first", num_samples=1, seq_len=384, avg_bits=3.0, progress=False)
    one, _ = api.calibrate(loaded=smollm, output=tmp_path / "one.safetensors", **args)
    split = load_model()
    n = split.model.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "disk", "lm_head": "disk"}
    device_map.update({f"model.layers.{i}": "cpu" if i < n - 3 else "disk" for i in range(n)})
    model = accelerate.dispatch_model(split.model, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    assert any(p.device.type == "meta" for p in model.parameters())  # really offloaded
    two, _ = api.calibrate(model, tokenizer=split.tokenizer, output=tmp_path / "two.safetensors", **args)
    # and loaded by kvarn with an accelerate strategy (here all layers land on the one CPU)
    api.calibrate(device_map="sequential", output=tmp_path / "three.safetensors", **args)
    a = Recipe.load(tmp_path / "one.safetensors")
    for other in ("two", "three"):
        b = Recipe.load(tmp_path / f"{other}.safetensors")
        assert a.layer_formats() == b.layer_formats(), other
        for kind in ("k_log_std", "v_log_std"):
            torch.testing.assert_close(getattr(b, kind), getattr(a, kind), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw, words", [
    ({"device_map": "everywhere"}, ("--device-map everywhere", "sequential")),
    ({"device_map": "auto", "device": "cpu"}, ("--device cpu", "leave --device at auto")),
])
def test_bad_device_map_fails_before_loading(kw, words, tmp_path, monkeypatch):
    import kvarn.models

    monkeypatch.setattr(kvarn.models, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(KvarnError) as e:
        api.calibrate(output=tmp_path / "r.safetensors", progress=False, **kw)
    assert one_line(str(e.value)) and all(w in str(e.value) for w in words), str(e.value)
    assert not (tmp_path / "r.safetensors").exists()


def test_device_map_with_a_model_object_is_refused(smollm, tmp_path):
    with pytest.raises(KvarnError, match="dispatch it yourself"):
        api.calibrate(smollm.model, tokenizer=smollm.tokenizer, device_map="auto", output=tmp_path / "r.safetensors",
                      progress=False)
