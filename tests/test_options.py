"""Issue 9, point 3: the options users look for, on the CLI and with the same keywords in the API —
--device, --dtype, --revision, --trust-remote-code, hub downloads, --text-column, chat rows, --seed,
-v/-q, defaults in every --help, and loaded transformers objects passed to api.calibrate/evaluate.
Everything runs on a tiny bf16 Llama built locally (no hub)."""

from __future__ import annotations

import json
import time

import click
import pytest
import torch
from click.testing import CliRunner

from kvarn import api, models
from kvarn.cli import main
from kvarn.errors import KvarnError
from kvarn.models import load_model, resolve_device, resolve_dtype
from tiny import tiny_model_dir, words_text

WIN = ("--num-windows", 1, "--seq-len", 300)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_fails(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    model = tiny_model_dir(d / "model")
    held = d / "held.txt"
    held.write_text(words_text(3000, seed=1))
    calib = d / "calib.txt"
    calib.write_text(words_text(3000, seed=2))
    return {"dir": model, "held": held, "calib": calib, "tmp": d}


def _eval_json(tiny, *extra):
    res = run("eval", tiny["dir"], "--no-recipe", "--text", tiny["held"], *WIN, "--methods", "kivi-2", "--json", *extra)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


# -- --dtype ----------------------------------------------------------------------------------------
def test_dtype_auto_is_the_configs_own(tiny):
    assert load_model(str(tiny["dir"])).model.dtype == torch.bfloat16  # was float32 before issue 9
    assert load_model(str(tiny["dir"]), dtype="float32").model.dtype == torch.float32
    assert resolve_dtype("auto", None) == torch.float32  # no config (GGUF): float32
    rep = _eval_json(tiny)
    assert rep["provenance"]["dtype"] == "bfloat16"
    rep = _eval_json(tiny, "--dtype", "float32")
    assert rep["provenance"]["dtype"] == "float32"
    res = run("eval", tiny["dir"], "--no-recipe", "--dtype", "int8")
    assert res.exit_code == 2 and "int8" in res.output  # click's choice, before anything runs
    with pytest.raises(KvarnError, match="--dtype float8"):
        load_model(str(tiny["dir"]), dtype="float8")


# -- --device ---------------------------------------------------------------------------------------
def test_device(tiny):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    for bad in ("tpu", "cuda:x", "mps"):
        with pytest.raises(KvarnError, match=f"--device {bad}"):
            resolve_device(bad)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(KvarnError, match=f"--device cuda:{n + 3}"):
        resolve_device(f"cuda:{n + 3}")
    if not torch.cuda.is_available():
        line = assert_fails(run("eval", tiny["dir"], "--no-recipe", "--text", tiny["held"], *WIN, "--device", "cuda"),
                            "--device cuda", "--device cpu")
        assert "cannot load" not in line
    assert _eval_json(tiny, "--device", "cpu")["provenance"]["device"] == "cpu"


# -- --revision, --trust-remote-code, the hub ------------------------------------------------------
def test_revision_and_trust_remote_code_reach_from_pretrained(tiny, monkeypatch):
    """With a reachable hub (faked) an id is fetched with the flags' revision and
    trust_remote_code and without local_files_only; the loaders are the real ones, pointed at the
    tiny folder."""
    import transformers

    seen = []
    real = {cls: cls.from_pretrained.__func__ for cls in
            (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM)}

    def fake(cls):
        def from_pretrained(klass, name, *a, **kw):
            if name == "some-org/some-model":  # (transformers' own inner calls pass the folder)
                seen.append((cls.__name__, name, dict(kw)))
                kw.pop("revision", None), kw.pop("local_files_only", None), kw.pop("trust_remote_code", None)
                name = str(tiny["dir"])
            return real[cls](klass, name, *a, **kw)
        return classmethod(from_pretrained)

    for cls in real:
        monkeypatch.setattr(cls, "from_pretrained", fake(cls))
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    rep = _eval_json({**tiny, "dir": "some-org/some-model"}, "--revision", "v1.0", "--trust-remote-code")
    assert {c for c, _, _ in seen} == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"}
    for cls, name, kw in seen:
        assert name == "some-org/some-model" and kw.get("revision") == "v1.0", (cls, kw)
        assert kw.get("trust_remote_code") is True and kw.get("local_files_only") is False, (cls, kw)
    assert rep["model_id"] == "some-org/some-model@v1.0" and rep["provenance"]["revision"] == "v1.0"


def test_revision_of_a_local_model_is_refused(tiny):
    line = assert_fails(run("calibrate", tiny["dir"], "--revision", "main", "--calib", tiny["calib"]), "--revision main",
                        "local folder", "Hugging Face model id")
    assert not (tiny["dir"] / "kvarn").exists(), line


def test_offline_hub_message_is_unchanged_and_fast(monkeypatch):
    for k in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(models, "_HUB_REACHABLE", {})
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    t = time.time()
    assert models.hub_reachable(timeout=2) is False
    with pytest.raises(KvarnError) as ei:
        load_model("no-such-org/no-such-model")
    assert time.time() - t < 15
    msg = str(ei.value)
    assert "not in the local Hugging Face cache; this machine cannot reach the hub" in msg and "\n" not in msg
    monkeypatch.setenv("HF_ENDPOINT", "https://huggingface.co")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # behind a proxy: the proxy is what is probed
    assert models.hub_reachable(timeout=2) is False and "127.0.0.1:9" in models._HUB_REACHABLE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_HUB_REACHABLE", {"127.0.0.1:9": True})
    assert models.hub_reachable() is False  # offline mode is respected without a probe


# -- --text-column, chats, --seed --------------------------------------------------------------------
def test_text_column_and_chat_rows_on_the_cli(tiny):
    rows = tiny["tmp"] / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"id": i, "body": p}) for i, p in enumerate(words_text(3000, 3).split("\n"))))
    assert_fails(run("eval", tiny["dir"], "--no-recipe", "--text", rows, *WIN), "rows.jsonl:1", "'text'", "--text-column")
    rep = _eval_json({**tiny, "held": rows}, "--text-column", "body")
    assert "jsonl" in rep["text"]
    assert_fails(run("eval", tiny["dir"], "--no-recipe", "--text", tiny["held"], "--text-column", "body"),
                 "--text-column body", "plain text")
    assert_fails(run("calibrate", tiny["dir"], "--calib", tiny["held"], "--text-column", "body"), "--text-column body")
    chats = tiny["tmp"] / "chats.jsonl"
    paras = words_text(3000, 4).split("\n")
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]})
                               for a, b in zip(paras[::2], paras[1::2])))
    rep = _eval_json({**tiny, "held": chats})
    assert "chat" in rep["text"]
    bare = tiny_model_dir(tiny["tmp"] / "no-template", chat_template=None)
    assert_fails(run("eval", bare, "--no-recipe", "--text", chats, *WIN, "--methods", "kivi-2"), "chat template")


def test_seed_picks_the_windows(tiny):
    a, b, a2 = (_eval_json(tiny, "--seed", s) for s in (0, 1, 0))
    assert a["results"][0]["ppl"] == a2["results"][0]["ppl"] != b["results"][0]["ppl"]
    assert (a["seed"], b["seed"], b["provenance"]["seed"]) == (0, 1, 1)
    errs = []
    for seed in (0, 1, 0):  # calibrate: the seed picks the calibration windows too
        r, _ = api.calibrate(str(tiny["dir"]), calib=str(tiny["calib"]), num_samples=1, seq_len=300, seed=seed,
                             output=tiny["tmp"] / f"seed{seed}.safetensors", progress=False, overwrite=True)
        errs.append(r.k_err)
        assert r.seed == seed
    assert torch.equal(errs[0], errs[2]) and not torch.equal(errs[0], errs[1])



def test_seed_reaches_the_passkey_prompts(monkeypatch):
    """eval --task passkey --seed N draws the prompts under N (a second draw of the same contexts)."""
    seen = {}

    def fake(*a, **kw):
        seen.update(kw)
        raise KvarnError("stop here")

    monkeypatch.setattr(api, "evaluate_passkey", fake)
    for args, seed in (((), 0), (("--seed", 1), 1)):
        assert_fails(run("eval", "--no-recipe", "--task", "passkey", "--contexts", 4096, *args), "stop here")
        assert seen["seed"] == seed


def test_clip_default_is_the_values_only(tiny):
    """Calibration clips the values' ranges and leaves the keys at min/max unless told otherwise
    (clipped keys lose passkey retrieval at 4k); --clip both and --no-clip still reach both ends,
    and the API's default is the CLI's."""
    from kvarn.recipe import Recipe

    def clips(*args):
        out = tiny["tmp"] / f"clip{len(args)}{'-'.join(map(str, args))}.safetensors"
        res = run("calibrate", tiny["dir"], "--calib", tiny["calib"], "--num-samples", 1, "--seq-len", 300, "-q",
                  "-o", out, *args)
        assert res.exit_code == 0, res.output
        return {(f.k.clip, f.v.clip) for f in Recipe.load(out).layer_formats()}

    assert api.DEFAULT_CLIP == "values"
    assert clips() == {(False, True)}
    assert clips("--clip", "both") == {(True, True)}
    assert clips("--no-clip") == clips("--clip", "none") == {(False, False)}
    r, _ = api.calibrate(str(tiny["dir"]), calib=str(tiny["calib"]), num_samples=1, seq_len=300, progress=False,
                         output=tiny["tmp"] / "clip-api.safetensors")
    assert {(f.k.clip, f.v.clip) for f in r.layer_formats()} == {(False, True)}

# -- -v / -q -----------------------------------------------------------------------------------------
def test_verbose_and_quiet(tiny):
    args = ("eval", tiny["dir"], "--no-recipe", "--text", tiny["held"], *WIN, "--methods", "kivi-2")
    loud = run(*args, "-v")
    assert loud.exit_code == 0 and "kvarn: loaded" in loud.stderr and "bfloat16" in loud.stderr, loud.stderr
    quiet = run(*args, "-q")
    assert quiet.exit_code == 0 and quiet.stderr.strip() == "", quiet.stderr
    assert "kivi-2" in quiet.stdout
    assert_fails(run(*args, "-v", "-q"), "-v and -q")
    import logging

    import transformers

    log = logging.getLogger("kvarn")  # each command leaves logging as it found it (no stale stream handler)
    assert log.handlers == [] and log.propagate and log.level == logging.NOTSET
    assert transformers.logging.is_progress_bar_enabled()


# -- --help ------------------------------------------------------------------------------------------
def test_every_help_shows_every_default():
    for name, cmd in main.commands.items():
        res = run(name, "--help")
        assert res.exit_code == 0
        ctx = click.Context(cmd, info_name=name, show_default=True)
        for p in cmd.params:
            if not isinstance(p, click.Option) or (p.is_flag and not p.count) or p.name == "help":
                continue
            record = p.get_help_record(ctx)
            assert record and "default:" in record[1], f"kvarn {name} {p.opts[0]}: no default in {record}"
            assert record[0].split(",")[0].split()[0] in res.output


# -- loaded transformers objects -------------------------------------------------------------------
def test_api_takes_a_loaded_model_and_tokenizer(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny["dir"], dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(tiny["dir"])
    kw = dict(text=str(tiny["held"]), num_windows=1, seq_len=300, methods=["kivi-2"], progress=False)
    by_object = api.evaluate(model, tokenizer=tok, **kw)
    by_path = api.evaluate(str(tiny["dir"]), **kw)
    assert by_object.results[0].ppl == pytest.approx(by_path.results[0].ppl, rel=1e-5)
    assert by_object.provenance["model_source"].startswith("object:") and by_object.model_id == str(tiny["dir"])
    out = tiny["tmp"] / "obj.safetensors"
    recipe, rep = api.calibrate(model, tokenizer=tok, calib=str(tiny["calib"]), num_samples=1, seq_len=300,
                                output=out, progress=False)
    recipe.check_model(model.config, out)
    assert rep.provenance["dtype"] == "bfloat16" and out.exists()
    with pytest.raises(KvarnError, match="tokenizer"):
        api.evaluate(model, **kw)
    with pytest.raises(KvarnError, match="device='cpu'"):
        api.evaluate(model, tokenizer=tok, device="cpu", **kw)
