"""Tests for kvarn.data: wiki text, load_text sources, calibration specs, token windows."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from kvarn import data
from kvarn.data import (
    CalibSpec,
    load_calib_spec,
    load_text,
    make_windows,
    resolve_calib,
    spec_hash,
    tokenize_text,
    wiki_text,
)
from kvarn.errors import KvarnError


@pytest.fixture(scope="module", autouse=True)
def _tmp_cache(tmp_path_factory):
    """Every test here uses a fresh cache folder, so nothing is written to the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KVARN_CACHE", str(tmp_path_factory.mktemp("kvarn-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def wiki():
    t0 = time.perf_counter()
    first = wiki_text("first")
    t1 = time.perf_counter()
    second = wiki_text("second")
    full = wiki_text("all")
    t2 = time.perf_counter()
    return {"first": first, "second": second, "all": full, "t_extract": t1 - t0, "t_cached": t2 - t1}


def _tiny_tokenizer(bos: bool = True, model_max_length: int = 128):
    """A small byte-level BPE tokenizer trained on the fly (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog.\nAnarchism is a political philosophy.",
        "Autism is a neurodevelopmental disorder.\n\nAlbedo is the measure of reflection.",
    ] * 20
    tk.train_from_iterator(corpus, trainer)
    kwargs = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=model_max_length, **kwargs)


def _assert_one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# --------------------------------------------------------------------------------------------------
# wiki text
# --------------------------------------------------------------------------------------------------


def test_wiki_halves_are_large_and_disjoint(wiki):
    first, second, full = wiki["first"], wiki["second"], wiki["all"]
    n1, n2 = len(first.split()), len(second.split())
    assert n1 > 150_000 and n2 > 150_000, (n1, n2)
    assert 400_000 < len(full.split()) < 560_000
    # split at an article boundary: the halves concatenate to the whole, nothing shared
    assert first + "\n\n" + second == full
    assert second[:200] not in first
    assert first[:200] not in second
    # halves balanced by characters
    assert abs(len(first) - len(second)) < 0.2 * len(full)


def test_wiki_text_is_clean(wiki):
    full = wiki["all"]
    for markup in ("[[", "]]", "{{", "}}", "'''", "<ref", "#REDIRECT"):
        assert markup not in full, markup
    assert "\n==" not in full  # headings are plain lines
    assert "  " not in full  # whitespace collapsed
    # case and punctuation kept; paragraphs separated by newlines
    assert "Anarchism is a political philosophy that advocates self-governed societies" in full
    assert full.count("\n") > 1000


def test_wiki_cache_is_fast_and_atomic(wiki):
    assert wiki["t_cached"] < 1.0, wiki["t_cached"]
    files = list((data.cache_dir() / "data").iterdir())
    assert [f.suffix for f in files] == [".txt"], files  # no leftover temp files
    t0 = time.perf_counter()
    assert wiki_text("first") == wiki["first"]
    assert time.perf_counter() - t0 < 1.0


def test_wiki_sources_via_load_text(wiki):
    text, desc = load_text("wiki:second")
    assert text == wiki["second"]
    assert "wiki:second" in desc
    with pytest.raises(KvarnError) as ei:
        load_text("wiki:third")
    _assert_one_line_error(ei, "wiki:third", "wiki:first")


# --------------------------------------------------------------------------------------------------
# load_text: files, datasets
# --------------------------------------------------------------------------------------------------


def test_txt_round_trip(tmp_path):
    text = "Première ligne — with ünïcödé.\nSecond paragraph, 2 lines.\n\nThird."
    p = tmp_path / "corpus.txt"
    p.write_text(text, encoding="utf-8")
    got, desc = load_text(str(p))
    assert got == text
    assert "corpus.txt" in desc


def test_jsonl_round_trip(tmp_path):
    rows = [{"text": "alpha one", "id": 1}, {"text": "beta two"}, {"text": "gamma três"}]
    p = tmp_path / "rows.jsonl"
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    got, desc = load_text(str(p))
    assert got == "alpha one\n\nbeta two\n\ngamma três"
    assert "rows.jsonl" in desc


def test_saved_dataset_dir_round_trip(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["first row", "", "second row"], "n": [1, 2, 3]})
    d = tmp_path / "saved_ds"
    ds.save_to_disk(str(d))
    got, desc = load_text(str(d))
    assert got == "first row\n\nsecond row"
    assert "saved_ds" in desc

    bad = tmp_path / "no_text_col"
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(bad))
    with pytest.raises(KvarnError) as ei:
        load_text(str(bad))
    _assert_one_line_error(ei, "no_text_col", '"text"', "body")


def test_hf_source_success_and_unreachable_hub(monkeypatch):
    import datasets

    calls = []

    def fake_ok(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["hello", "world"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_ok)
    text, desc = load_text("hf:some/ds:cfg")
    assert text == "hello\n\nworld"
    assert calls == [("some/ds", "cfg", "train")]
    load_text("hf:some/ds:cfg:validation")
    assert calls[-1] == ("some/ds", "cfg", "validation")

    def fake_offline(*a, **k):
        raise ConnectionError("Couldn't reach 'some/ds' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", fake_offline)
    with pytest.raises(KvarnError) as ei:
        load_text("hf:some/ds")
    _assert_one_line_error(ei, "hf:some/ds", "hub", "local")

    with pytest.raises(KvarnError) as ei:
        load_text("hf:")
    _assert_one_line_error(ei, "hf:")


def test_missing_file(tmp_path):
    p = tmp_path / "nope.txt"
    with pytest.raises(KvarnError) as ei:
        load_text(str(p))
    _assert_one_line_error(ei, "nope.txt")


@pytest.mark.parametrize("content", [b"", b"  \n\t\n"])
def test_empty_txt(tmp_path, content):
    p = tmp_path / "empty.txt"
    p.write_bytes(content)
    with pytest.raises(KvarnError) as ei:
        load_text(str(p))
    _assert_one_line_error(ei, "empty.txt", "no text")


def test_empty_jsonl(tmp_path):
    p = tmp_path / "blank.jsonl"
    p.write_text('{"text": ""}\n{"text": "   "}\n', encoding="utf-8")
    with pytest.raises(KvarnError) as ei:
        load_text(str(p))
    _assert_one_line_error(ei, "blank.jsonl")


def test_non_utf8(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(KvarnError) as ei:
        load_text(str(p))
    _assert_one_line_error(ei, "latin1.txt", "UTF-8")

    q = tmp_path / "latin1.jsonl"
    q.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(KvarnError) as ei:
        load_text(str(q))
    _assert_one_line_error(ei, "latin1.jsonl", "UTF-8")


def test_bad_jsonl_line(tmp_path):
    p = tmp_path / "broken.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "oops"\n', encoding="utf-8")
    with pytest.raises(KvarnError) as ei:
        load_text(str(p))
    _assert_one_line_error(ei, "broken.jsonl:2", "JSON")


@pytest.mark.parametrize("line", ['{"body": "x"}', '{"text": 5}', '["text"]'])
def test_jsonl_without_text(tmp_path, line):
    p = tmp_path / "notext.jsonl"
    p.write_text('{"text": "fine"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(KvarnError) as ei:
        load_text(str(p))
    _assert_one_line_error(ei, "notext.jsonl:3", '"text"')


def test_unsupported_file_type_and_plain_folder(tmp_path):
    p = tmp_path / "table.csv"
    p.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(KvarnError) as ei:
        load_text(str(p))
    _assert_one_line_error(ei, "table.csv")
    d = tmp_path / "plainfolder"
    d.mkdir()
    with pytest.raises(KvarnError) as ei:
        load_text(str(d))
    _assert_one_line_error(ei, "plainfolder")


# --------------------------------------------------------------------------------------------------
# calibration specs
# --------------------------------------------------------------------------------------------------


def test_default_spec():
    spec = load_calib_spec("wiki-first-half")
    assert spec == CalibSpec(
        name="wiki-first-half",
        source="wiki:first",
        num_samples=6,
        seq_len=1024,
        description=spec.description,
    )
    assert resolve_calib(None) == spec
    # every shipped spec loads
    for name in data.available_calib_specs():
        assert load_calib_spec(name).name


def test_unknown_spec_name():
    with pytest.raises(KvarnError) as ei:
        load_calib_spec("no-such-set")
    _assert_one_line_error(ei, "no-such-set", "wiki-first-half")


def test_missing_spec_path(tmp_path):
    with pytest.raises(KvarnError) as ei:
        load_calib_spec(str(tmp_path / "gone.yaml"))
    _assert_one_line_error(ei, "gone.yaml")


@pytest.mark.parametrize(
    "body, field",
    [
        ("source: wiki:first\nnum_samples: 4\nseq_len: 64\ncolour: red\n", "colour"),
        ("source: wiki:first\nnum_samples: four\nseq_len: 64\n", "num_samples"),
        ("source: wiki:first\nnum_samples: 4\nseq_len: 0\n", "seq_len"),
        ("source: wiki:first\nnum_samples: true\nseq_len: 64\n", "num_samples"),
        ("source: wiki:first\nnum_samples: 4.5\nseq_len: 64\n", "num_samples"),
        ("source: wiki:first\nseq_len: 64\n", "num_samples"),
        ("source: 12\nnum_samples: 4\nseq_len: 64\n", "source"),
        ("source: wiki:middle\nnum_samples: 4\nseq_len: 64\n", "source"),
        ("source: wiki:first\nnum_samples: 4\nseq_len: 64\ndescription: [1, 2]\n", "description"),
        ("- just\n- a list\n", "mapping"),
        ("source: [unclosed\n", "YAML"),
    ],
)
def test_spec_with_bad_field(tmp_path, body, field):
    p = tmp_path / "badspec.yaml"
    p.write_text(body, encoding="utf-8")
    with pytest.raises(KvarnError) as ei:
        load_calib_spec(str(p))
    _assert_one_line_error(ei, "badspec.yaml", field)


def test_spec_relative_source_and_hash(tmp_path):
    (tmp_path / "mine.txt").write_text("some text here", encoding="utf-8")
    p = tmp_path / "myspec.yaml"
    p.write_text("source: mine.txt\nnum_samples: 2\nseq_len: 8\n", encoding="utf-8")
    spec = load_calib_spec(str(p))
    assert spec.name == "myspec"
    assert Path(spec.source) == (tmp_path / "mine.txt").resolve()
    h = spec_hash(spec)
    assert len(h) == 12 and all(c in "0123456789abcdef" for c in h)
    assert spec_hash(load_calib_spec(str(p))) == h  # deterministic
    assert spec_hash(CalibSpec(spec.name, spec.source, 3, spec.seq_len)) != h
    assert spec_hash(resolve_calib(str(p), seq_len=16)) != h


def test_resolve_calib_sources_and_overrides(tmp_path):
    spec = resolve_calib("wiki:second", num_samples=4)
    assert (spec.source, spec.num_samples, spec.seq_len) == ("wiki:second", 4, 1024)
    t = tmp_path / "c.jsonl"
    assert resolve_calib(str(t), seq_len=32).source == str(t)
    with pytest.raises(KvarnError) as ei:
        resolve_calib(None, seq_len=0)
    _assert_one_line_error(ei, "--seq-len")


# --------------------------------------------------------------------------------------------------
# make_windows
# --------------------------------------------------------------------------------------------------


def test_make_windows_shape_bos_and_continuity(wiki):
    tok = _tiny_tokenizer(bos=True, model_max_length=128)
    text = wiki["first"][:60_000]  # several tokenization chunks
    stream = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    # chunked tokenization is exact for byte-level BPE
    assert tokenize_text(tok, text) == stream
    w = make_windows(tok, text, 5, 33, "wiki:first")
    assert w.shape == (5, 33) and w.dtype == torch.long
    assert (w[:, 0] == tok.bos_token_id).all()
    body = w[:, 1:]
    assert body.reshape(-1).tolist() == stream[: 5 * 32]
    for i in range(4):  # window i+1 continues where window i stops
        j = 32 * (i + 1)
        assert body[i, -1].item() == stream[j - 1] and body[i + 1, 0].item() == stream[j]


def test_make_windows_without_bos(wiki):
    tok = _tiny_tokenizer(bos=False)
    assert tok.bos_token_id is None
    text = wiki["second"][:20_000]
    w = make_windows(tok, text, 3, 16, "x")
    assert w.shape == (3, 16)
    assert w.reshape(-1).tolist() == tokenize_text(tok, text)[:48]


def test_make_windows_too_short(tmp_path):
    tok = _tiny_tokenizer()
    p = tmp_path / "short.txt"
    p.write_text("The quick brown fox jumps over the lazy dog.", encoding="utf-8")
    text, desc = load_text(str(p))
    n = len(tokenize_text(tok, text))
    with pytest.raises(KvarnError) as ei:
        make_windows(tok, text, 4, 64, desc)
    _assert_one_line_error(ei, "short.txt", f"has {n} tokens", str(4 * 63), "--num-samples")
    # exactly enough tokens works
    assert make_windows(tok, text, 1, n + 1, desc).shape == (1, n + 1)


def test_make_windows_empty_and_bad_sizes():
    tok = _tiny_tokenizer()
    with pytest.raises(KvarnError) as ei:
        make_windows(tok, "  \n ", 1, 8, "empty-thing.txt")
    _assert_one_line_error(ei, "empty-thing.txt", "empty")
    with pytest.raises(KvarnError) as ei:
        make_windows(tok, "hello there", 0, 8, "sizes.txt")
    _assert_one_line_error(ei, "sizes.txt", "--num-samples")
    # eval's flags are named in eval's messages, never calibrate's
    with pytest.raises(KvarnError) as ei:
        make_windows(tok, "hello there", 50, 8, "held.txt", flags=("--num-windows", "--seq-len"))
    msg = _assert_one_line_error(ei, "held.txt", "--num-windows")
    assert "--num-samples" not in msg
    with pytest.raises(KvarnError) as ei:
        make_windows(tok, "hello there", 1, 1, "sizes.txt")
    _assert_one_line_error(ei, "sizes.txt", "seq-len")


# --------------------------------------------------------------------------------------------------
# issue 9: windows under a seed, --text-column, chat rows
# --------------------------------------------------------------------------------------------------


def test_seed_draws_windows_among_the_whole_text(wiki):
    tok = _tiny_tokenizer(bos=True)
    text = wiki["first"][:30_000]
    stream = tokenize_text(tok, text)
    body = 31
    whole = [stream[i * body:(i + 1) * body] for i in range(len(stream) // body)]
    a, a2, b = (make_windows(tok, text, 6, 32, "x", seed=s) for s in (0, 0, 1))
    assert torch.equal(a, a2) and not torch.equal(a, b)
    for w in (a, b):
        assert (w[:, 0] == tok.bos_token_id).all()
        idx = [whole.index(row) for row in w[:, 1:].tolist()]  # each is one of the text's windows ...
        assert idx == sorted(set(idx))  # ... distinct, in text order
    assert max(whole.index(r) for r in b[:, 1:].tolist()) > 6  # not just the first ones
    first = make_windows(tok, text, 6, 32, "x", seed=None)  # None: the start of the text, in order
    assert first[:, 1:].reshape(-1).tolist() == stream[: 6 * body]
    with pytest.raises(KvarnError, match="--seed"):
        make_windows(tok, text, 6, 32, "x", seed="1")


def test_text_column(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text('{"body": "alpha beta", "text": 3}\n{"body": "gamma"}\n', encoding="utf-8")
    text, _ = load_text(str(p), text_column="body")
    assert text == "alpha beta\n\ngamma"
    with pytest.raises(KvarnError) as ei:
        load_text(str(p))
    _assert_one_line_error(ei, "rows.jsonl:1", "'text'", "int", "--text-column")
    txt = tmp_path / "plain.txt"
    txt.write_text("some words", encoding="utf-8")
    for call in (lambda: load_text(str(txt), text_column="body"), lambda: resolve_calib(str(txt), text_column="body")):
        with pytest.raises(KvarnError) as ei:
            call()
        _assert_one_line_error(ei, "--text-column body", "plain text")
    spec = resolve_calib(str(p), text_column="body")
    assert spec.text_column == "body" and spec_hash(spec) != spec_hash(resolve_calib(str(p)))
    # a spec at the default column keeps the hash it had before the field existed
    old = CalibSpec(name="n", source="s", num_samples=1, seq_len=2)
    canon = json.dumps({"name": "n", "source": "s", "num_samples": 1, "seq_len": 2, "description": ""},
                       sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    import hashlib

    assert spec_hash(old) == hashlib.sha256(canon.encode()).hexdigest()[:12]


def test_chat_rows_render_with_the_chat_template(tmp_path):
    from kvarn.data import Documents, render_text

    tok = _tiny_tokenizer(bos=True)
    tok.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    p = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": "The quick fox?"}, {"role": "assistant", "content": "Jumps."}]},
            {"text": "A plain row."}]
    p.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    text, desc = load_text(str(p))
    assert isinstance(text, Documents) and "chat" in desc and "words" in desc
    rendered = render_text(tok, text, "chats.jsonl")
    assert rendered == "<s>user: The quick fox?\n<s>assistant: Jumps.\n\n\nA plain row."
    ids = tokenize_text(tok, rendered)
    assert ids.count(tok.bos_token_id) == 2  # the template's special tokens are tokens, not text
    w = make_windows(tok, text, 1, len(ids) + 1, "chats.jsonl")
    assert w[0, 1:].tolist() == ids
    bare = _tiny_tokenizer(bos=True)
    with pytest.raises(KvarnError) as ei:
        make_windows(bare, text, 1, 8, "chats.jsonl")
    _assert_one_line_error(ei, "chats.jsonl", "no chat template")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": ["image", "text"]}]}), encoding="utf-8")
    with pytest.raises(KvarnError) as ei:
        load_text(str(bad))
    _assert_one_line_error(ei, "bad.jsonl:1", "message 0", "role", "content")


def test_chat_column_of_a_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    from kvarn.data import Documents

    d = tmp_path / "ds"
    datasets.Dataset.from_dict({"conv": [[{"role": "user", "content": "hi there"}], [{"role": "user", "content": "bye"}]],
                                "id": [1, 2]}).save_to_disk(str(d))
    text, desc = load_text(str(d), text_column="conv")
    assert isinstance(text, Documents) and text[1] == [{"role": "user", "content": "bye"}]
    with pytest.raises(KvarnError) as ei:
        load_text(str(d))
    _assert_one_line_error(ei, "no \"text\" column", "conv", "--text-column")
