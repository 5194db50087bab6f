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
    p = _resave(good, tmp_path / "hd.safetensors", meta_change=_edit_info(("fingerprint", "head_dim"), 72))
    assert_error(lambda: Recipe.load(p), "hd.safetensors", "head_dim=72")
    p = _resave(good, tmp_path / "opt.safetensors", meta_change=_edit_info(("k_format", "normalize"), "sometimes"))
    assert_error(lambda: Recipe.load(p), "opt.safetensors", "normalize")
    p = _resave(good, tmp_path / "json.safetensors", meta_change=lambda m: m.update(recipe="{not json"))
    assert_error(lambda: Recipe.load(p), "json.safetensors", "JSON")


# -- recipes validated as data (issue 10, point 3) ----------------------------------------------
def _set_info(**changes):
    def change(meta):
        info = json.loads(meta["recipe"])
        for key, value in changes.items():
            obj, *path = key.split("__")
            target = info
            for part in [obj, *path][:-1]:
                target = target[part]
            target[[obj, *path][-1]] = value
        meta["recipe"] = json.dumps(info)
    return change


def _fix_digest(meta):
    """Recompute the fingerprint digest after an edit, as a careful forger would."""
    info = json.loads(meta["recipe"])
    fp = dict(info["fingerprint"])
    import hashlib

    info["fingerprint_digest"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    meta["recipe"] = json.dumps(info)


@pytest.mark.parametrize("changes, needles", [
    ({"fingerprint__num_layers": 0}, ("fingerprint.num_layers", "0", "[1, 4096]")),
    ({"fingerprint__num_layers": "30"}, ("fingerprint.num_layers", '"30"', "a string", "integer")),
    ({"fingerprint__num_layers": True}, ("fingerprint.num_layers", "bool")),
    ({"seed": "abc"}, ("seed", "abc", "integer")),
    ({"keep_first_tile": "false"}, ("keep_first_tile", "a string", "JSON boolean")),
    ({"keep_first_tile": 0}, ("keep_first_tile", "JSON boolean")),
    ({"tile": "128"}, ("tile", "integer")),
    ({"candidate_bits": [4, 2]}, ("candidate_bits", "strictly increasing")),
    ({"candidate_bits": []}, ("candidate_bits",)),
    ({"k_format__codec": "rtn-sym"}, ("k_format.codec", "rtn")),
    ({"v_format__axis": "channel"}, ("v_format.axis", "token")),
    ({"k_format__hadamard": "yes"}, ("k_format.hadamard", "boolean")),
    ({"budget__avg_bits": float("nan")}, ("budget.avg_bits",)),
    ({"budget__tp_sizes": [0]}, ("budget.tp_sizes", "[1, 1024]")),
    ({"budget__tp_sizes": "2"}, ("budget.tp_sizes", "list")),
    ({"budget__tp_sizes": [True]}, ("budget.tp_sizes",)),
    ({"budget__min_k_bits": "4"}, ("budget.min_k_bits", "integer")),
    ({"budget__min_k_bits": 0}, ("budget.min_k_bits", "[1, 16]")),
    ({"calibration__objective": "vibes"}, ("calibration.objective", "fisher")),
    ({"created": "yesterday"}, ("created", "ISO 8601")),
    ({"model_id": 5}, ("model_id", "string")),
    ({"achieved_bits_per_element": 1.0}, ("achieved_bits_per_element", "bit tables")),
])
def test_metadata_fields_have_types_and_ranges(tmp_path, good, changes, needles):
    p = _resave(good, tmp_path / "edited.safetensors", meta_change=_set_info(**changes))
    msg = assert_error(lambda: Recipe.load(p), "edited.safetensors", *needles)
    assert "Traceback" not in msg
    if "achieved_bits_per_element" not in changes:  # needs the bit tables: checked by load only
        assert_error(lambda: read_header(p), "edited.safetensors")  # inspect reads the header the same way


def test_key_floor_must_hold_in_the_bit_tables(tmp_path):
    import dataclasses

    r = make_recipe()
    lowest = int(r.k_bits.min())
    ok = dataclasses.replace(r, budget={"avg_bits": 3.0, "min_k_bits": lowest})
    assert Recipe.load(ok.save(tmp_path / "ok.safetensors")).budget["min_k_bits"] == lowest
    bad = dataclasses.replace(r, budget={"avg_bits": 3.0, "min_k_bits": lowest + 1})
    assert_error(lambda: Recipe.load(bad.save(tmp_path / "floor.safetensors")), "floor.safetensors",
                 f"k bits value {lowest}", f"budget.min_k_bits {lowest + 1}")


@pytest.mark.parametrize("value, needle", [("[1, 2]", "JSON list"), ("null", "JSON null"), ('"x"', "JSON str"),
                                           ("[" * 20000 + "]" * 20000, "not JSON")])
def test_recipe_json_must_be_an_object(tmp_path, good, value, needle):
    p = _resave(good, tmp_path / "j.safetensors", meta_change=lambda m: m.update(recipe=value))
    assert_error(lambda: Recipe.load(p), "j.safetensors", needle)


def test_fingerprint_digest_is_recomputed(tmp_path, good):
    # a forged digest next to the true fingerprint
    p = _resave(good, tmp_path / "forged.safetensors", meta_change=_set_info(fingerprint_digest="0123456789abcdef"))
    assert_error(lambda: Recipe.load(p), "forged.safetensors", "fingerprint_digest", "0123456789abcdef", "recomputed")
    # a fingerprint edited to pass as another model's, digest left as it was
    p = _resave(good, tmp_path / "other.safetensors", meta_change=_set_info(fingerprint__vocab_size=999))
    assert_error(lambda: Recipe.load(p), "other.safetensors", "fingerprint_digest")
    # edited and digest recomputed: loads, and the model check still refuses it (vocab differs)
    def edit(m):
        _set_info(fingerprint__vocab_size=999)(m)
        _fix_digest(m)
    p = _resave(good, tmp_path / "consistent.safetensors", meta_change=edit)
    assert_error(lambda: Recipe.load(p).check_model(tiny_config(), p), "consistent.safetensors", "vocab_size")


@pytest.mark.parametrize("value, needle", [(-80.0, "-80"), (12.0, "12"), (-10.0, "-10")])
def test_priors_have_a_physical_range(tmp_path, good, value, needle):
    """log_std −80 passed the old finiteness check and made eval print ppl nan."""
    def change(t):
        t["layers.1.v.log_std"] = t["layers.1.v.log_std"].clone()
        t["layers.1.v.log_std"][0, 3] = value
    p = _resave(good, tmp_path / "prior.safetensors", tensor_change=change)
    assert_error(lambda: Recipe.load(p), "prior.safetensors", "v log_std", needle, "layer 1, head 0", "-9.70, 11.09")
    from kvarn.quant.formats import LOG_STD_MAX, LOG_STD_MIN

    assert LOG_STD_MIN == pytest.approx(-9.704, abs=1e-3) and LOG_STD_MAX == pytest.approx(11.090, abs=1e-3)


def test_errors_and_bits_have_ranges(tmp_path, good):
    def neg(t):
        t["layers.0.k.err"] = -t["layers.0.k.err"]
    p = _resave(good, tmp_path / "err.safetensors", tensor_change=neg)
    assert_error(lambda: Recipe.load(p), "err.safetensors", "k err", ">= 0")
    # 1 is a width kvarn can store, but not one this recipe was calibrated for
    def one_bit(t):
        t["layers.0.v.bits"] = torch.tensor([1, 1], dtype=torch.int8)
    p = _resave(good, tmp_path / "bits1.safetensors", tensor_change=one_bit)
    assert_error(lambda: Recipe.load(p), "bits1.safetensors", "v bits value 1", "[2, 3, 4, 8, 16]")


def test_huge_and_hostile_metadata(tmp_path, good):
    big = _resave(good, tmp_path / "big.safetensors", meta_change=_set_info(model_id="x" * (10 << 20)))
    msg = assert_error(lambda: Recipe.load(big), "big.safetensors", "recipe", "MiB", "64 KiB")
    assert len(msg) < 400
    extra = _resave(good, tmp_path / "extra.safetensors", meta_change=lambda m: m.update(junk="y" * (10 << 20)))
    assert_error(lambda: read_header(extra), "extra.safetensors", "junk", "64 KiB")
    # ANSI escapes and a carriage return in the model id: loads (it is only a name), printed escaped
    evil = "\x1b[2J\x1b[31mpwned\rmodel\u202e"
    p = _resave(good, tmp_path / "ansi.safetensors", meta_change=_set_info(model_id=evil))
    assert Recipe.load(p).model_id == evil
    from kvarn import api

    text = api.format_inspect(api.inspect(p))
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    assert "\\x1b[2J\\x1b[31mpwned\\x0dmodel\\u202e" in text
    with pytest.raises(KvarnError) as e:  # and in an error message naming it
        Recipe.load(p).check_model(tiny_config(num_hidden_layers=4), p)
    assert "\x1b" not in str(e.value) and "\\x1b[31mpwned" in str(e.value)


def test_paths_that_are_not_recipe_files(tmp_path, good):
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    assert_error(lambda: Recipe.load(loop), "loop.safetensors", "symbolic link loop")
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "gone.safetensors")
    assert_error(lambda: Recipe.load(dangling), "dangling.safetensors", "dangling", "gone.safetensors")
    folder = tmp_path / "holder"
    (folder / "kvarn_recipe.safetensors").mkdir(parents=True)  # a folder with a recipe's name
    assert_error(lambda: Recipe.load(folder / "kvarn_recipe.safetensors"), "kvarn_recipe.safetensors", "is a folder")
    assert_error(lambda: Recipe.load(folder), "kvarn_recipe.safetensors", "is a folder")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    assert_error(lambda: Recipe.load(empty), "empty-folder", "no recipe in it")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    assert_error(lambda: Recipe.load(fifo), "pipe.safetensors", "named pipe")  # and it does not block reading it
    # the hint names the flag of the command that was used
    assert_error(lambda: Recipe.load(tmp_path / "nope.safetensors", flag="--kvarn-recipe"), "--kvarn-recipe")
    msg = assert_error(lambda: Recipe.load(tmp_path / "nope.safetensors", flag=None), "kvarn calibrate")
    assert "--recipe" not in msg
