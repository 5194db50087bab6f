"""Recipe format: round trip, atomic writes, and every corrupt input → one-line KvarnError."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from kvarn.errors import KvarnError
from kvarn.recipe import FORMAT_VERSION, ModelFingerprint, Recipe, read_header


def tiny_config(**kw):
    base = dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=256,
                vocab_size=128, intermediate_size=64)
    base.update(kw)
    return LlamaConfig(**base)


def make_recipe(config=None, seed=0) -> Recipe:
    config = config or tiny_config()
    fp = ModelFingerprint.from_config(config)
    g = torch.Generator().manual_seed(seed)
    L, H, D = fp.num_layers, fp.num_kv_heads, fp.head_dim
    choices = torch.tensor([2, 3, 4, 8, 16])
    return Recipe(
        model_id="tiny-llama", fingerprint=fp, tile=128, keep_first_tile=True,
        k_options={"axis": "channel", "normalize": "none", "hadamard": True, "clip": True, "codec": "rtn"},
        v_options={"axis": "token", "normalize": "static", "hadamard": True, "clip": True, "codec": "rtn"},
        k_bits=choices[torch.randint(0, 5, (L, H), generator=g)], v_bits=choices[torch.randint(0, 5, (L, H), generator=g)],
        k_log_std=torch.randn(L, H, D, generator=g), v_log_std=torch.randn(L, H, D, generator=g),
        k_err=torch.rand(L, H, 4, generator=g), v_err=torch.rand(L, H, 4, generator=g),
        candidate_bits=(2, 3, 4, 8), calibration={"set": "x", "source": "wiki:first"}, budget={"avg_bits": 3.0},
        created="2026-11-29T00:00:00+00:00", seed=seed,
    )


def assert_error(fn, *needles):
    with pytest.raises(KvarnError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_round_trip(tmp_path):
    r = make_recipe(seed=3)
    path = r.save(tmp_path / "r.safetensors")
    back = Recipe.load(path)
    for name in ("k_bits", "v_bits", "k_log_std", "v_log_std", "k_err", "v_err"):
        assert torch.equal(getattr(r, name), getattr(back, name)), name
    assert back.fingerprint == r.fingerprint
    assert (back.tile, back.keep_first_tile, back.k_options, back.v_options) == (r.tile, r.keep_first_tile, r.k_options, r.v_options)
    assert back.bits_per_element() == pytest.approx(r.bits_per_element())
    assert back.calibration == r.calibration and back.budget == r.budget and back.seed == 3
    head = read_header(path)
    assert head["format_version"] == FORMAT_VERSION
    assert head["fingerprint_digest"] == r.fingerprint.digest()
    assert head["achieved_bits_per_element"] == pytest.approx(r.bits_per_element(), abs=1e-5)
    # a directory means the default name inside it
    r.save(tmp_path)
    assert (tmp_path / "kvarn_recipe.safetensors").exists()
    assert torch.equal(Recipe.load(tmp_path).k_bits, r.k_bits)


def test_tensor_keys_follow_convention(tmp_path):
    path = make_recipe().save(tmp_path / "r.safetensors")
    keys = set(load_file(path))
    assert "layers.0.k.bits" in keys and "layers.2.v.log_std" in keys and "layers.1.k.err" in keys
    assert len(keys) == 3 * 2 * 3


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        make_recipe().save(tmp_path / "r.safetensors")
    assert os.listdir(tmp_path) == []  # neither the recipe nor a temp file


def test_fingerprint_mismatch(tmp_path):
    path = make_recipe().save(tmp_path / "r.safetensors")
    r = Recipe.load(path)
    r.check_model(tiny_config(), path)  # same shape: fine
    assert_error(lambda: r.check_model(tiny_config(num_hidden_layers=4), path), "r.safetensors", "num_layers", "kvarn calibrate")
    assert_error(lambda: r.check_model(tiny_config(rope_theta=5.0), path), "r.safetensors", "rope")


def _resave(path, dest, meta_change=None, tensor_change=None):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta_change:
        meta_change(meta)
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, str(dest), metadata=meta)
    return dest


@pytest.fixture
def good(tmp_path):
    return make_recipe().save(tmp_path / "good.safetensors")


def test_missing_file(tmp_path):
    assert_error(lambda: Recipe.load(tmp_path / "nope.safetensors"), "nope.safetensors", "kvarn calibrate")


def test_empty_and_truncated(tmp_path, good):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert_error(lambda: Recipe.load(tmp_path / "empty.safetensors"), "empty.safetensors")
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    assert_error(lambda: Recipe.load(tmp_path / "trunc.safetensors"), "trunc.safetensors")


def test_not_safetensors(tmp_path):
    p = tmp_path / "pickle.safetensors"
    p.write_bytes(b"\x80\x04\x95" + os.urandom(200))
    assert_error(lambda: Recipe.load(p), "pickle.safetensors", "safetensors")


def test_safetensors_but_not_a_recipe(tmp_path):
    p = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(p), metadata={"format": "pt"})
    assert_error(lambda: Recipe.load(p), "weights.safetensors", "not a kvarn recipe")


def test_future_version(tmp_path, good):
    p = _resave(good, tmp_path / "future.safetensors", meta_change=lambda m: m.update(format_version="2.0"))
    assert_error(lambda: Recipe.load(p), "future.safetensors", "2.0", "upgrade kvarn")


def test_bad_tensors(tmp_path, good):
    p = _resave(good, tmp_path / "shape.safetensors", tensor_change=lambda t: t.update({"layers.1.k.log_std": torch.zeros(2, 32)}))
    assert_error(lambda: Recipe.load(p), "shape.safetensors", "layers.1.k.log_std")
    p = _resave(good, tmp_path / "missing.safetensors", tensor_change=lambda t: t.pop("layers.2.v.bits"))
    assert_error(lambda: Recipe.load(p), "missing.safetensors", "layers.2.v.bits")
    p = _resave(good, tmp_path / "bits.safetensors", tensor_change=lambda t: t.update({"layers.0.k.bits": torch.tensor([5, 4], dtype=torch.int8)}))
    assert_error(lambda: Recipe.load(p), "bits.safetensors", "5")
    p = _resave(good, tmp_path / "nan.safetensors", tensor_change=lambda t: t.update({"layers.0.v.log_std": torch.full((2, 64), float("nan"))}))
    assert_error(lambda: Recipe.load(p), "nan.safetensors", "NaN")
    p = _resave(good, tmp_path / "extra.safetensors", tensor_change=lambda t: t.update({"layers.9.k.bits": torch.zeros(2, dtype=torch.int8)}))
    assert_error(lambda: Recipe.load(p), "extra.safetensors", "layers.9.k.bits")


def _edit_info(key, value):
    def change(meta):
        info = json.loads(meta["recipe"])
        if isinstance(key, tuple):
            info[key[0]][key[1]] = value
        else:
            info[key] = value
        meta["recipe"] = json.dumps(info)
    return change


def test_unsupported_tile_head_dim_and_options(tmp_path, good):
    p = _resave(good, tmp_path / "tile.safetensors", meta_change=_edit_info("tile", 96))
    assert_error(lambda: Recipe.load(p), "tile.safetensors", "tile=96")
    p = _resave(good, tmp_path / "hd.safetensors", meta_change=_edit_info(("fingerprint", "head_dim"), 80))
    assert_error(lambda: Recipe.load(p), "hd.safetensors", "head_dim=80")
    p = _resave(good, tmp_path / "opt.safetensors", meta_change=_edit_info(("k_format", "normalize"), "sometimes"))
    assert_error(lambda: Recipe.load(p), "opt.safetensors", "normalize")
    p = _resave(good, tmp_path / "json.safetensors", meta_change=lambda m: m.update(recipe="{not json"))
    assert_error(lambda: Recipe.load(p), "json.safetensors", "JSON")
