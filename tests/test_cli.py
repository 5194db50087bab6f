"""End to end through the CLI on the real embedded model, and every bad input → exit 2, one line."""

import json

import pytest
import torch
from click.testing import CliRunner

from kvarn.cli import main

from test_recipe import make_recipe, tiny_config


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_fails(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip() if hasattr(result, "stderr") else result.output.strip()
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def test_calibrate_inspect_eval(tmp_path, smollm):
    out = tmp_path / "r.safetensors"
    res = run("calibrate", "--calib", "wiki:first", "--num-samples", 1, "--seq-len", 384, "--avg-bits", 3.0, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["bits_per_element"] <= 3.0 + 1e-9 and rep["bits_per_element"] > 2.5
    assert rep["calibration"]["source"] == "wiki:first" and out.exists()

    png = tmp_path / "bits.png"
    res = run("inspect", out, "--json", "--plot", png)
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["fingerprint"]["num_layers"] == 30 and len(s["k_bits"]) == 30 and len(s["k_bits"][0]) == 3
    assert s["bytes_per_token"] == pytest.approx(sum(s["bytes_per_token_per_layer"]))
    assert s["bits_per_element"] == pytest.approx(rep["bits_per_element"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = run("inspect", out)
    assert "bits/element" in text.output and "layer" in text.output

    res = run("eval", "--recipe", out, "--num-windows", 2, "--seq-len", 384, "--methods", "kvarn-k4v2-g128", "--json")
    assert res.exit_code == 0, res.output
    rows = {r["method"].split(" ")[0]: r for r in json.loads(res.stdout)["results"]}
    assert set(rows) == {"fp16", "recipe", "kvarn-k4v2-g128"}
    assert rows["fp16"]["kl"] == 0 and rows["fp16"]["top1"] == 1 and rows["fp16"]["delta_ppl_pct"] == 0
    assert rows["recipe"]["bits_per_element"] == pytest.approx(rep["bits_per_element"])
    assert rows["kvarn-k4v2-g128"]["bits_per_element"] == pytest.approx(3.5625)
    for m in ("recipe", "kvarn-k4v2-g128"):
        assert rows[m]["kl"] > 0 and 0.8 < rows[m]["top1"] < 1, rows[m]
    table = run("eval", "--recipe", out, "--num-windows", 1, "--seq-len", 300, "--methods", "fp8-e4m3")
    assert "Δppl" in table.output and "fp8-e4m3" in table.output


def test_bad_inputs(tmp_path, smollm):
    missing = tmp_path / "missing.safetensors"
    assert_fails(run("eval", "--recipe", missing, "--num-windows", 1, "--seq-len", 300), "missing.safetensors", "kvarn calibrate")
    other = make_recipe(tiny_config()).save(tmp_path / "other.safetensors")
    assert_fails(run("eval", "--recipe", other, "--num-windows", 1, "--seq-len", 300), "other.safetensors", "kvarn calibrate")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a recipe at all" * 10)
    assert_fails(run("inspect", garbage), "garbage.safetensors")

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_fails(run("calibrate", "--calib", empty, "-o", tmp_path / "x.safetensors"), "empty.txt")
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of calibration text.")
    assert_fails(run("calibrate", "--calib", short, "-o", tmp_path / "x.safetensors"), "short.txt")
    assert_fails(run("calibrate", "no-such-org/no-such-model", "-o", tmp_path / "x.safetensors"), "no-such-org/no-such-model", "hub")
    assert_fails(run("calibrate", "--avg-bits", "1.5", "--num-samples", 1, "--seq-len", 384, "-o", tmp_path / "x.safetensors"), "--avg-bits")
    assert_fails(run("calibrate", "--seq-len", 200, "-o", tmp_path / "x.safetensors"), "seq_len 200", "--seq-len")
    res = run("calibrate", "--tile", "96")
    assert res.exit_code == 2 and "96" in res.output  # click rejects it before anything runs
    assert_fails(run("eval", "--text", "wiki:first", "--recipe", other), "other.safetensors")
    assert not list(tmp_path.glob("x.safetensors*")) and not list(tmp_path.glob(".x.safetensors*")), "partial file left"


def test_unsupported_head_dim_and_mixed_attention_models(tmp_path, smollm):
    """Any HF directory: a tiny random Qwen2 with sliding + full layers and MQA calibrates and
    evaluates; one with head_dim 80 is refused in one line."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = smollm.tokenizer
    def make(name, **kw):
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, **kw)
        torch.manual_seed(0)
        d = tmp_path / name
        Qwen2ForCausalLM(cfg).save_pretrained(d)
        tok.save_pretrained(d)
        return d

    mixed = make("mixed", use_sliding_window=True, sliding_window=96, max_window_layers=1,
                 layer_types=["full_attention", "sliding_attention"])
    res = run("calibrate", mixed, "--calib", "wiki:first", "--num-samples", 1, "--seq-len", 300, "--avg-bits", 3.0, "--json")
    assert res.exit_code == 0, res.output
    # beside the checkpoint, in a subfolder that weight loaders do not read
    assert (mixed / "kvarn" / "recipe.safetensors").exists() and not (mixed / "kvarn_recipe.safetensors").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(mixed)  # the folder still loads as a plain checkpoint
    res = run("eval", mixed, "--num-windows", 1, "--seq-len", 300, "--methods", "kivi-2", "--json")  # recipe found
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["results"]
    assert [r["method"].split(" ")[0] for r in rows] == ["fp16", "recipe", "kivi-2"], rows
    assert all(r["ppl"] == r["ppl"] for r in rows)  # no NaN through sliding-window masks
    # a recipe where kvarn 0.1 put it (top level) still loads, through --recipe and as the default
    (mixed / "kvarn" / "recipe.safetensors").rename(mixed / "kvarn_recipe.safetensors")
    res = run("eval", mixed, "--recipe", mixed / "kvarn_recipe.safetensors", "--num-windows", 1, "--seq-len", 300,
              "--methods", "kivi-2", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["results"][1]["method"].startswith("recipe"), res.stdout

    hd80 = make("hd80", head_dim=80)
    assert_fails(run("calibrate", hd80, "--calib", "wiki:first", "--num-samples", 1, "--seq-len", 300), "head_dim=80")


def test_outputs_never_replace_what_kvarn_did_not_write(tmp_path):
    """-o and --plot are checked before any model loads (a model that does not exist would fail
    later, so its error must not be the one seen) and replace only kvarn's own files."""
    import os
    import stat

    from kvarn.outputs import check_output
    from kvarn.recipe import is_recipe_file

    nope = str(tmp_path / "no-such-model")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"\x00" * 64)
    before = weights.read_bytes()
    for extra in ((), ("--overwrite",)):  # a model's weights: never, not even with --overwrite
        assert_fails(run("calibrate", nope, "-o", weights, *extra), "model.safetensors", "weights")
    assert weights.read_bytes() == before
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert_fails(run("calibrate", nope, "-o", notes), "notes.txt", "--overwrite")
    assert notes.read_text() == "mine"
    assert check_output(notes, flag="-o", what="kvarn recipe", is_ours=is_recipe_file, overwrite=True) == notes
    if os.path.exists("/dev/full"):  # a device stays a device, even for root and --overwrite
        assert_fails(run("calibrate", nope, "-o", "/dev/full", "--overwrite"), "/dev/full", "regular file")
        assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_fails(run("calibrate", nope, "-o", afile / "r.safetensors"), "afile", "not a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK) or os.geteuid() != 0:  # root may write anyway: then nothing to check
            assert_fails(run("calibrate", nope, "-o", ro / "r.safetensors"), "ro", "writable")
    finally:
        ro.chmod(0o700)
    if os.path.isdir("/proc/self"):
        assert_fails(run("calibrate", nope, "-o", "/proc/self/kvarn.safetensors"), "/proc/self", "writable")
    # the recipe kvarn wrote may be replaced; --plot refuses a folder and a non-PNG
    recipe = make_recipe(tiny_config()).save(tmp_path / "r.safetensors")
    assert check_output(recipe, flag="-o", what="kvarn recipe", is_ours=is_recipe_file) == recipe
    assert_fails(run("inspect", recipe, "--plot", tmp_path), str(tmp_path), "folder")
    assert_fails(run("inspect", recipe, "--plot", notes), "notes.txt", "--overwrite")
    res = run("inspect", recipe, "--plot", tmp_path / "bits.png")
    assert res.exit_code == 0, res.output
    res = run("inspect", recipe, "--plot", tmp_path / "bits.png")  # our own PNG: replaced
    assert res.exit_code == 0, res.output
