"""lm-evaluation-harness integration (``kvarn.lm_eval``) on local YAML tasks over local jsonl files.

The tasks are cut from the held-out Wikipedia half with the embedded SmolLM2: contexts of 300
tokens, so that continuations read a completed tile quantized (tile 128: the first tile is fp16,
the second quantized, the third the continuation's own). Compared:
lm-eval's plain ``hf`` model, ``kvarn`` with an all-fp16 recipe (must equal ``hf`` up to the fp16
rounding of K/V) and ``kvarn`` with the shipped 3-bit recipe (must differ from ``hf``, but little).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'kvarn[lm-eval]')")

from kvarn.api import EMBEDDED_RECIPE  # noqa: E402
from kvarn.recipe import Recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CTX_TOKENS = 300  # tokens 128-255 are read quantized by the continuation (tokens 256+)
MC_DOCS, GEN_DOCS = 4, 2  # small: every choice is one forward pass, three models run (2 cores in CI)


def _write_tasks(tokenizer, folder: Path) -> Path:
    """Two tasks in ``folder``: ``kvarn_wiki_next`` (multiple choice: which of two 16-token
    continuations follows the context) and ``kvarn_wiki_gen`` (generate_until: 6 greedy tokens)."""
    from kvarn.data import load_text

    text, _ = load_text("wiki:second")
    ids = tokenizer(text[:200_000], add_special_tokens=False)["input_ids"]
    step = CTX_TOKENS + 16
    pieces = [(tokenizer.decode(ids[i * step:i * step + CTX_TOKENS]), tokenizer.decode(ids[i * step + CTX_TOKENS:(i + 1) * step]))
              for i in range(MC_DOCS + GEN_DOCS)]
    with open(folder / "next.jsonl", "w") as f:
        for j, (ctx, cont) in enumerate(pieces[:MC_DOCS]):
            other = pieces[(j + 1) % MC_DOCS][1]
            label = j % 2
            choices = [other, cont] if label else [cont, other]
            f.write(json.dumps({"context": ctx, "choices": choices, "label": label}) + "\n")
    with open(folder / "gen.jsonl", "w") as f:
        for j, (ctx, cont) in enumerate(pieces[MC_DOCS:]):
            f.write(json.dumps({"context": ctx[: len(ctx) - 59 * j], "target": cont}) + "\n")  # two lengths: a padded batch
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: context\n"
    (folder / "next.yaml").write_text(
        f"task: kvarn_wiki_next\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'next.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text(
        f"task: kvarn_wiki_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: target\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


@pytest.fixture(scope="module")
def tasks(smollm, tmp_path_factory):
    return _write_tasks(smollm.tokenizer, tmp_path_factory.mktemp("lm_eval_tasks"))


def _run(lm, tasks: Path, names: list[str]) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(tasks)),
                           log_samples=True, bootstrap_iters=0, verbosity="WARNING")


def _loglikelihoods(out: dict, task: str) -> torch.Tensor:
    """``[docs, choices]`` summed log-probabilities of each choice, in document order."""
    rows = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return torch.tensor([[float(r[0][0]) for r in s["resps"]] for s in rows], dtype=torch.float64)


def _fp16_recipe(recipe: Recipe) -> Recipe:
    return dataclasses.replace(recipe, k_bits=torch.full_like(recipe.k_bits, 16), v_bits=torch.full_like(recipe.v_bits, 16))


def test_loglikelihood_reads_the_quantized_cache(smollm, tasks):
    """Multiple choice through lm-eval: the fp16 recipe gives HF's numbers (K/V rounded to fp16 is
    the only difference), the shipped 3-bit recipe gives different numbers that stay close."""
    from lm_eval.models.huggingface import HFLM

    from kvarn.lm_eval import KVarNLM

    model, tok = smollm.model, smollm.tokenizer
    common = dict(tokenizer=tok, batch_size=4, device="cpu")
    hf = _loglikelihoods(_run(HFLM(pretrained=model, **common), tasks, ["kvarn_wiki_next"]), "kvarn_wiki_next")
    shipped = Recipe.load(EMBEDDED_RECIPE)
    fp16 = _loglikelihoods(_run(KVarNLM(pretrained=model, recipe=_fp16_recipe(shipped), **common), tasks, ["kvarn_wiki_next"]),
                           "kvarn_wiki_next")
    quant = _loglikelihoods(_run(KVarNLM(pretrained=model, recipe=str(EMBEDDED_RECIPE), **common), tasks, ["kvarn_wiki_next"]),
                            "kvarn_wiki_next")
    assert hf.shape == (MC_DOCS, 2)
    assert (fp16 - hf).abs().max() < 0.02, f"fp16 recipe vs hf: max |Δ loglikelihood| {(fp16 - hf).abs().max():.4f}"
    gap = (quant - hf).abs()
    # the 3-bit cache changes every 16-token continuation's log-probability, by a few tenths at most
    assert gap.min() > 1e-3, f"3-bit recipe reads like fp16 (min |Δ| {gap.min():.2e}): the cache is not quantized"
    assert gap.mean() < 0.5 and gap.max() < 2.0, f"3-bit recipe vs hf: mean |Δ| {gap.mean():.3f}, max {gap.max():.3f}"
    assert (quant.argmax(1) == hf.argmax(1)).float().mean() >= 3 / 4


def test_generate_until_uses_kvarncache_row_by_row(smollm, tasks):
    """generate_until with a left-padded batch of two prompt lengths gives, per prompt, the tokens
    of ``model.generate`` with a ``KVarNCache`` on that prompt alone."""
    from kvarn.lm_eval import KVarNLM
    from kvarn.model_hook import uninstall
    from kvarn.runtime.hf_cache import KVarNCache

    model, tok = smollm.model, smollm.tokenizer
    lm = KVarNLM(pretrained=model, tokenizer=tok, batch_size=2, device="cpu", recipe=str(EMBEDDED_RECIPE))
    out = _run(lm, tasks, ["kvarn_wiki_gen"])
    rows = sorted(out["samples"]["kvarn_wiki_gen"], key=lambda s: s["doc_id"])
    docs = [json.loads(line) for line in (tasks / "gen.jsonl").read_text().splitlines()]
    assert len(rows) == len(docs) == GEN_DOCS
    for s, doc in zip(rows, docs):
        ids = torch.tensor([lm.tok_encode(doc["context"])])  # lm-eval's encoding of the prompt
        try:
            with torch.no_grad():
                ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                     past_key_values=KVarNCache(lm.recipe, model), pad_token_id=tok.pad_token_id)
        finally:
            uninstall(model)
        want = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True).split("\n\n")[0]
        assert s["resps"][0][0] == want, (s["doc_id"], s["resps"][0][0], want)
    info = out["config"]["model_info"] if "model_info" in out["config"] else out["config"]
    assert str(EMBEDDED_RECIPE) in json.dumps(info, default=str)


def test_beam_search_and_a_missing_recipe_are_one_line_errors(smollm):
    from kvarn.errors import KvarnError
    from kvarn.lm_eval import KVarNLM

    with pytest.raises(KvarnError, match="no kvarn recipe") as e:
        KVarNLM(pretrained=smollm.model, tokenizer=smollm.tokenizer, device="cpu")
    assert "\n" not in str(e.value)
    lm = KVarNLM(pretrained=smollm.model, tokenizer=smollm.tokenizer, device="cpu", recipe=str(EMBEDDED_RECIPE))
    with pytest.raises(KvarnError, match="num_beams=2"):
        lm._model_generate(torch.tensor([[1, 2, 3]]), max_length=5, stop=[], num_beams=2)


def test_command_line_runs_a_local_task(tasks, tmp_path):
    """``python -m kvarn.lm_eval --model kvarn`` (lm-eval's own CLI): the embedded model by name, its
    shipped recipe found by default, a task from --include_path; results written as lm-eval does."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kvarn.lm_eval", "--model", "kvarn", "--model_args", "pretrained=smollm2",
           "--include_path", str(tasks), "--tasks", "kvarn_wiki_next", "--limit", "2", "--device", "cpu",
           "--batch_size", "4", "--output_path", str(tmp_path / "out")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (result,) = list((tmp_path / "out").rglob("results_*.json"))
    data = json.loads(result.read_text())
    assert 0.0 <= data["results"]["kvarn_wiki_next"]["acc,none"] <= 1.0
    assert data["config"]["model"] == "kvarn"
    assert "smollm2-135m-instruct.safetensors" in json.dumps(data["config"])

    bad = subprocess.run(cmd[:6] + ["pretrained=smollm2,recipe=/nonexistent/r.safetensors"] + cmd[7:],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr[-3000:]
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "/nonexistent/r.safetensors" in last, last
