"""Issue 9, point 6: reports — strict JSON with provenance, distinct rows for recipes of one file
name, eval's refusal of a window that reads nothing quantized, and heatmaps whose colours mean the
same width in every plot. On a tiny bf16 Llama built locally."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from kvarn import api
from kvarn.cli import main
from kvarn.errors import KvarnError
from kvarn.report import dumps, provenance, strict
from test_recipe import make_recipe
from tiny import tiny_model_dir, words_text

PROVENANCE_KEYS = {"kvarn", "torch", "transformers", "python", "date", "command", "seed"}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def strict_loads(text: str):
    """json.loads that refuses NaN/Infinity (Python's default parser accepts them)."""
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-reports")
    model = tiny_model_dir(d / "model")
    held = d / "held.txt"
    held.write_text(words_text(3000, seed=1))
    from transformers import AutoConfig

    return {"dir": model, "held": held, "tmp": d, "config": AutoConfig.from_pretrained(model)}


def test_strict_json_helpers():
    obj = {"a": float("nan"), "b": [1.0, float("inf"), -float("inf")], "c": (torch.tensor(2.5), torch.float16), 3: None}
    assert strict(obj) == {"a": None, "b": [1.0, None, None], "c": [2.5, "torch.float16"], "3": None}
    json.dumps(strict(obj), allow_nan=False)
    assert strict_loads(dumps(obj))["a"] is None
    p = provenance(7, command=["kvarn", "eval", "a b"])
    assert PROVENANCE_KEYS <= set(p) and p["seed"] == 7 and p["command"] == "kvarn eval 'a b'"
    assert p["torch"] == torch.__version__.split("+")[0] or p["torch"].startswith(torch.__version__.split("+")[0])


def test_eval_json_is_strict_with_provenance(tiny):
    """One window: every standard error is NaN inside — null in the JSON."""
    r = make_recipe(tiny["config"]).save(tiny["tmp"] / "r.safetensors")
    res = run("eval", tiny["dir"], "--recipe", r, "--text", tiny["held"], "--num-windows", 1, "--seq-len", 300,
              "--methods", "kivi-2", "--seed", 5, "--json", "-q")
    assert res.exit_code == 0, res.output
    rep = strict_loads(res.stdout)
    json.dumps(rep, allow_nan=False)
    assert all(row["kl_se"] is None and row["delta_ppl_pct_se"] is None for row in rep["results"])
    assert all(math.isfinite(row["ppl"]) for row in rep["results"])
    prov = rep["provenance"]
    assert PROVENANCE_KEYS <= set(prov) and prov["seed"] == 5 and prov["transformers"]
    assert prov["command"].startswith("kvarn eval ") and "--seed 5" in prov["command"]
    assert api.evaluate(str(tiny["dir"]), recipe=r, text=str(tiny["held"]), num_windows=1, seq_len=300, methods=[],
                        progress=False).to_dict()["results"][0]["kl_se"] is None  # the Python report too
    text = run("eval", tiny["dir"], "--recipe", r, "--text", tiny["held"], "--num-windows", 1, "--seq-len", 300,
               "--methods", "kivi-2", "-q")
    assert text.exit_code == 0 and "kivi-2" in text.stdout


def test_calibrate_and_inspect_json_carry_provenance(tiny):
    out = tiny["tmp"] / "cal.safetensors"
    res = run("calibrate", tiny["dir"], "--calib", tiny["held"], "--num-samples", 1, "--seq-len", 300, "--seed", 3,
              "-o", out, "--json", "-q")
    assert res.exit_code == 0, res.output
    rep = strict_loads(res.stdout)
    assert PROVENANCE_KEYS <= set(rep["provenance"]) and rep["provenance"]["seed"] == 3
    assert rep["provenance"]["command"].startswith("kvarn calibrate ")
    res = run("inspect", out, "--json")
    assert res.exit_code == 0, res.output
    s = strict_loads(res.stdout)
    assert s["seed"] == 3 and s["provenance"]["seed"] == 3 and s["provenance"]["command"].startswith("kvarn inspect ")


def test_recipes_with_the_same_file_name_get_their_own_rows(tiny):
    a, b = tiny["tmp"] / "a", tiny["tmp"] / "b"
    pa = make_recipe(tiny["config"], seed=1).save(a / "kvarn_recipe.safetensors")
    pb = make_recipe(tiny["config"], seed=2).save(b / "kvarn_recipe.safetensors")
    res = run("eval", tiny["dir"], "--recipe", pa, "--recipe", pb, "--text", tiny["held"], "--num-windows", 2,
              "--seq-len", 300, "--methods", "kivi-2", "--json", "-q")
    assert res.exit_code == 0, res.output
    rows = strict_loads(res.stdout)["results"]
    assert [r["method"] for r in rows] == ["fp16", "recipe (a/kvarn_recipe.safetensors)",
                                           "recipe (b/kvarn_recipe.safetensors)", "kivi-2"]
    assert [r["recipe_path"] for r in rows[1:3]] == [str(pa), str(pb)]
    assert rows[1]["bits_per_element"] != rows[2]["bits_per_element"]  # two recipes, not one twice
    assert api.recipe_labels(["x/r.safetensors", "y/q.safetensors"]) == ["recipe (r.safetensors)", "recipe (q.safetensors)"]
    with pytest.raises(KvarnError, match="given twice"):
        api.recipe_labels([pa, str(a / "." / "kvarn_recipe.safetensors")])


def test_eval_refuses_a_window_that_reads_nothing_quantized(tmp_path, tiny):
    """A query reads its own tile and the first tile in fp16: at 256 tokens (tile 128) nothing
    quantized is read and every method would look lossless. Checked before the weights load (a
    config-only model folder: loading would fail with another message)."""
    from test_cli import _config_only_model, assert_fails

    d = _config_only_model(tmp_path)
    res = run("eval", d, "--no-recipe", "--seq-len", 256)
    assert_fails(res, "--seq-len 256", "kvarn-k4v2-g128",
                        "first tile fp16", "longer than 256 tokens", "--seq-len 512 or more")
    # tile 1 (fp8, int4) reads quantized tokens at once; kivi-2 (no fp16 first tile) from token 128
    line = res.stderr.strip().splitlines()[-1]
    assert "fp8-e4m3" not in line and "int4" not in line and "kivi-2" not in line, line
    assert_fails(run("eval", d, "--no-recipe", "--methods", "kivi-2", "--seq-len", 128), "kivi-2", "longer than 128")
    assert_fails(run("eval", d, "--no-recipe", "--methods", "kivi-2", "--seq-len", 129), "cannot load this model folder")
    r = make_recipe(tiny["config"]).save(tmp_path / "r.safetensors")
    assert_fails(run("eval", tiny["dir"], "--recipe", r, "--methods", "fp8-e4m3", "--seq-len", 200),
                 "recipe (r.safetensors) (tile 128, first tile fp16)")
    # past two tiles the recipe is read quantized (a 2-bit recipe: KL > 0)
    low = make_recipe(tiny["config"])
    low.k_bits.fill_(2), low.v_bits.fill_(2)
    r2 = low.save(tmp_path / "r2.safetensors")
    rep = api.evaluate(str(tiny["dir"]), recipe=r2, text=str(tiny["held"]), num_windows=1, seq_len=300, methods=[],
                       progress=False)
    assert rep.results[1].kl > 0


def _cell_colors(png):
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(png)[..., :3]
    return {tuple(int(round(255 * c)) for c in px) for px in np.unique(img.reshape(-1, 3), axis=0)}


def test_heatmap_colours_mean_one_width_in_every_plot(tmp_path, tiny):
    from matplotlib.colors import to_rgb

    from kvarn.plot import WIDTH_COLORS, plot_bits_heatmap

    def rgb(w):
        return tuple(int(round(255 * c)) for c in to_rgb(WIDTH_COLORS[w][0]))

    low = make_recipe(tiny["config"])
    low.k_bits.fill_(2), low.v_bits.fill_(3)
    mixed = make_recipe(tiny["config"])
    mixed.k_bits[:] = torch.tensor([[2], [16]])
    mixed.v_bits[:] = torch.tensor([[8], [4]])
    p1, p2 = plot_bits_heatmap(low, tmp_path / "low.png"), plot_bits_heatmap(mixed, tmp_path / "mixed.png")
    c1, c2 = _cell_colors(p1), _cell_colors(p2)
    for w in WIDTH_COLORS:  # the legend lists every width in both pictures, in the same colour
        assert rgb(w) in c1 and rgb(w) in c2, w
    # the cells: exact colours (nearest-neighbour image) — count the 2-bit fill in each plot
    import matplotlib.image as mpimg
    import numpy as np

    def share(png, w):
        img = (mpimg.imread(png)[..., :3] * 255).round().astype(int)
        return float((np.abs(img - np.array(rgb(w))).sum(-1) == 0).mean())

    assert share(p1, 2) > 0.05 and share(p1, 3) > 0.05 and share(p1, 16) < 0.01  # 16 only in the legend
    assert share(p2, 16) > 0.03 and share(p2, 8) > 0.03


def test_accuracy_plot_replots_from_its_json(tmp_path):
    """bench/accuracy.py's plot() re-draws bench/results/accuracy.json without any eval, also with
    null standard errors (strict JSON of a one-window run) and a method it has not seen before."""
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        from accuracy import plot
    finally:
        sys.path.remove(str(bench))
    rows = json.loads((bench / "results" / "accuracy.json").read_text())["results"]
    rows = rows + [{**rows[-1], "method": "some-new-method", "delta_ppl_pct_se": None, "bits_per_element": 3.1}]
    out = tmp_path / "acc.png"
    plot([(1024, 8, rows), (4096, 2, rows[:4])], out)  # one row of axes per window length
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_passkey_report_is_strict_with_provenance():
    """The passkey report's JSON has provenance and no NaN (a rate's standard error over one trial)."""
    from kvarn.api import PasskeyReport, PasskeyResult
    import dataclasses

    fields = {f.name for f in dataclasses.fields(PasskeyResult)}
    res = {name: (float("nan") if "se" in name else 0) for name in fields}
    rep = PasskeyReport("m", "t", [2048], 1, [0.5], None, True, {2048: 2000.0}, [PasskeyResult(**res)],
                        provenance={"kvarn": "x", "seed": 0})
    text = json.dumps(rep.to_dict(), allow_nan=False)
    assert '"provenance"' in text and "NaN" not in text
