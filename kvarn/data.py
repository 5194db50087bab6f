"""Text sources, calibration specs and token windows.

Text sources (``load_text``):

* ``wiki:first`` / ``wiki:second`` / ``wiki:all`` -- plain text extracted from the MediaWiki dump that
  ships inside ``gensim`` (``gensim/test/test_data/enwiki-latest-pages-articles1...bz2``). ``first``
  and ``second`` split the articles in two halves by character count at an article boundary, so
  calibrating on one half and evaluating on the other never shares text.
* a ``.txt`` file (UTF-8) or a ``.jsonl`` file (field ``"text"`` of each line);
* ``hf:NAME[:CONFIG[:SPLIT]]`` -- a ``datasets`` dataset (column ``"text"``, split ``train``);
* a directory written by ``datasets.Dataset.save_to_disk`` (column ``"text"``).

In a ``.jsonl`` file or a dataset the column is ``text_column`` (``--text-column``, default ``text``);
a row's value is plain text or a chat: a list of ``{"role": ..., "content": ...}`` messages (a row
without ``text`` but with ``messages`` is a chat too). Chats are rendered with the model's chat
template when the tokenizer is known (``make_windows``), so ``load_text`` returns a ``Documents``
for them and a ``str`` otherwise.

Windows (``make_windows``) are drawn at random among all the non-overlapping windows of the text
under a seed (``--seed``), or taken from its start in order when ``seed`` is None.

Calibration specs are small YAML files in the top-level ``calibrate/`` folder (see its README).
"""

from __future__ import annotations

import bz2
import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from kvarn.errors import KvarnError
from kvarn.paths import kind_of, path_problem, shipped_dir

# --------------------------------------------------------------------------------------------------
# cache directory and atomic writes
# --------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The kvarn cache folder: ``$KVARN_CACHE`` if set, else ``~/.cache/kvarn`` (not created here)."""
    env = os.environ.get("KVARN_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kvarn"


def _ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KvarnError(
            f"cache folder {path}: cannot create it ({e.strerror or e}); "
            "set KVARN_CACHE to a writable folder"
        ) from e
    return path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    _ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------------------------------
# the embedded Wikipedia text (from gensim's test data)
# --------------------------------------------------------------------------------------------------

WIKI_PARTS = ("first", "second", "all")
_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# bump when the extraction below changes, so stale caches are not reused
_WIKI_EXTRACT_VERSION = 1
# articles are separated by a blank line; paragraphs inside an article by a single newline
_ARTICLE_SEP = "\n\n"

_RE_BOLD_ITALIC = re.compile(r"'{2,}")
_RE_HEADING = re.compile(r"^=+\s*(.*?)\s*=+$")
_RE_LIST_MARK = re.compile(r"^[*#:;]+\s*")
_RE_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_RE_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:])(?=\s|$)")


def _gensim_dump_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise KvarnError(
            "wiki text: the gensim package is not installed (it ships the Wikipedia sample); "
            "run `pip install gensim` or pass a local .txt/.jsonl file instead"
        )
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / _WIKI_DUMP
    if not path.is_file():
        raise KvarnError(
            f"wiki text: {path} is missing from the installed gensim; "
            "reinstall it with `pip install --force-reinstall gensim` or pass a local .txt/.jsonl file"
        )
    return path


def _clean_article(title: str, raw: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(raw)
    lines = [title.strip()]
    for line in text.split("\n"):
        line = _RE_BOLD_ITALIC.sub("", line)
        line = " ".join(line.split())
        m = _RE_HEADING.match(line)
        if m:
            line = m.group(1)
        line = _RE_LIST_MARK.sub("", line)
        line = _RE_EMPTY_PARENS.sub("", line)
        line = _RE_SPACE_BEFORE_PUNCT.sub(r"\1", line)
        line = " ".join(line.split())
        # drop lines with no letters or digits (leftover table/markup debris such as "*", "—", "✔")
        if line and any(c.isalnum() for c in line):
            lines.append(line)
    if len(lines) <= 1:
        return ""
    return "\n".join(lines)


def _extract_wiki(dump: Path) -> list[str]:
    try:
        from gensim.corpora.wikicorpus import extract_pages
    except ImportError as e:
        raise KvarnError(
            f"wiki text: cannot import gensim ({e}); run `pip install gensim` "
            "or pass a local .txt/.jsonl file instead"
        ) from e
    articles = []
    try:
        with bz2.open(dump, "rb") as f:
            for title, raw, _pageid in extract_pages(f):
                if not raw or raw.lstrip().lower().startswith("#redirect"):
                    continue
                article = _clean_article(title, raw)
                if article:
                    articles.append(article)
    except (OSError, EOFError, ValueError) as e:
        raise KvarnError(
            f"wiki text: cannot read {dump} ({e}); reinstall gensim with "
            "`pip install --force-reinstall gensim`"
        ) from e
    if not articles:
        raise KvarnError(f"wiki text: no articles found in {dump}; reinstall gensim")
    return articles


def _wiki_articles() -> list[str]:
    """All cleaned articles, in dump order (extracted once, then read from the cache)."""
    dump = _gensim_dump_path()
    st = dump.stat()
    key = hashlib.sha256(
        f"{_WIKI_EXTRACT_VERSION}:{st.st_size}:{st.st_mtime_ns}".encode()
    ).hexdigest()[:12]
    cached = cache_dir() / "data" / f"enwiki-gensim-{key}.txt"
    if cached.is_file():
        try:
            text = cached.read_text(encoding="utf-8")
            if text:
                return text.split(_ARTICLE_SEP)
        except (OSError, UnicodeDecodeError):
            pass  # unreadable cache: rebuild it below
    articles = _extract_wiki(dump)
    try:
        atomic_write_text(cached, _ARTICLE_SEP.join(articles))
    except (OSError, KvarnError):
        pass  # a read-only cache only costs speed
    return articles


def _split_index(articles: list[str]) -> int:
    """Index of the first article of the second half: the article boundary closest to half the chars."""
    total = sum(len(a) for a in articles)
    best_i, best_d, cum = 1, None, 0
    for i, a in enumerate(articles[:-1], start=1):
        cum += len(a)
        d = abs(2 * cum - total)
        if best_d is None or d < best_d:
            best_i, best_d = i, d
    return best_i


def wiki_text(part: str = "all") -> str:
    """Plain text of the embedded Wikipedia sample: ``part`` is ``first``, ``second`` or ``all``.

    ``first`` and ``second`` are the two halves of the articles by character count, split at an
    article boundary. Articles are separated by a blank line, paragraphs by a newline.
    """
    if part not in WIKI_PARTS:
        raise KvarnError(
            f"wiki:{part}: unknown part {part!r}; use one of wiki:first, wiki:second, wiki:all"
        )
    articles = _wiki_articles()
    if part == "all":
        chosen = articles
    else:
        k = _split_index(articles)
        chosen = articles[:k] if part == "first" else articles[k:]
    return _ARTICLE_SEP.join(chosen)


# --------------------------------------------------------------------------------------------------
# load_text: any supported source -> (text, description)
# --------------------------------------------------------------------------------------------------

_TEXT_SUFFIXES = {".txt", ".text", ".md", ""}
_JSONL_SUFFIXES = {".jsonl", ".ndjson"}
_SOURCES_HELP = (
    "use wiki:first|wiki:second|wiki:all, a .txt or .jsonl file, hf:NAME[:CONFIG[:SPLIT]], "
    "or a folder written by datasets' save_to_disk"
)


DEFAULT_TEXT_COLUMN = "text"
CHAT_COLUMN = "messages"


class Documents(list):
    """Rows of a source holding chats: each item is a plain text (``str``) or a conversation (a list
    of ``{"role": str, "content": str}``), rendered with the tokenizer's chat template by
    ``render_text``."""

    def words(self) -> int:
        return sum(_words(d) if isinstance(d, str) else sum(_words(m["content"]) for m in d) for d in self)


def _words(text) -> int:
    if isinstance(text, Documents):
        return text.words()
    return len(text.split())


def _has_text(text) -> bool:
    return bool(text) if isinstance(text, Documents) else bool(text.strip())


def _as_chat(value, where: str):
    """``value`` as a conversation (list of role/content dicts) or a one-line error."""
    if not value:
        raise KvarnError(f"{where}: an empty list of messages; each chat needs at least one "
                         '{"role": ..., "content": ...} message')
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise KvarnError(f"{where}: message {i} is not a {{\"role\": str, \"content\": str}} object "
                             f"(got {str(m)[:80]!r}); write each message as role and text content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _row_value(row: dict, column: str, where: str, how: str):
    """The text or chat of one row (``None`` for an empty one); a one-line error without either."""
    key = column
    if column not in row and column == DEFAULT_TEXT_COLUMN and CHAT_COLUMN in row:
        key = CHAT_COLUMN
    value = row.get(key)
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, list):
        return _as_chat(value, f"{where} ({key!r})")
    got = "missing" if key not in row else f"a {type(value).__name__}"
    raise KvarnError(f"{where}: field {key!r} is {got}, not text or a list of chat messages; {how}")


def _join(values: list) -> str | Documents:
    """Plain texts joined by a blank line, or ``Documents`` when any row is a chat."""
    if any(isinstance(v, list) for v in values):
        return Documents(values)
    return "\n\n".join(values)


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KvarnError(f"{path}: cannot read it ({e.strerror or e}); check the path and permissions") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KvarnError(
            f"{path}: not valid UTF-8 (bad byte at offset {e.start}); re-save the file as UTF-8"
        ) from e


def _load_txt(path: Path) -> str:
    text = _read_utf8(path)
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def _load_jsonl(path: Path, column: str = DEFAULT_TEXT_COLUMN) -> str | Documents:
    content = _read_utf8(path)
    parts = []
    how = (f'each line must be a JSON object like {{"{column}": "..."}}' if column != DEFAULT_TEXT_COLUMN else
           'each line must be a JSON object like {"text": "..."} or {"messages": [{"role": "user", "content": "..."}]}')
    how += "; --text-column picks another field"
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise KvarnError(f"{path}:{lineno}: not valid JSON ({e.msg}); {how}") from e
        if not isinstance(obj, dict):
            raise KvarnError(f"{path}:{lineno}: a JSON {type(obj).__name__}, not an object; {how}")
        value = _row_value(obj, column, f"{path}:{lineno}", how)
        if value is not None:
            parts.append(value)
    return _join(parts)


def _texts_from_dataset(ds, where: str, column: str = DEFAULT_TEXT_COLUMN) -> str | Documents:
    cols = list(getattr(ds, "column_names", None) or [])
    key = column
    if column not in cols and column == DEFAULT_TEXT_COLUMN and CHAT_COLUMN in cols:
        key = CHAT_COLUMN
    if key not in cols:
        raise KvarnError(
            f"{where}: has no \"{column}\" column (columns: {', '.join(cols) or 'none'}); "
            "name the column with --text-column (text or chat messages), or convert it to a .jsonl file"
        )
    how = "the column must hold text or lists of chat messages; pick another with --text-column"
    parts = []
    for i, t in enumerate(ds[key]):
        value = _row_value({key: t}, key, f"{where} row {i}", how) if t is not None else None
        if value is not None:
            parts.append(value)
    return _join(parts)


def _is_saved_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_saved_dataset(path: Path, column: str = DEFAULT_TEXT_COLUMN) -> tuple[str | Documents, str]:
    try:
        import datasets
    except ImportError as e:
        raise KvarnError(f"{path}: reading a saved dataset needs `pip install datasets`") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable folder
        raise KvarnError(
            f"{path}: cannot load it with datasets.load_from_disk ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); re-save it with Dataset.save_to_disk"
        ) from e
    where = str(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise KvarnError(
                f"{path}: saved DatasetDict has no \"train\" split (splits: {', '.join(ds)}); "
                "save the split you want with Dataset.save_to_disk"
            )
        ds = ds["train"]
        where = f"{path} (split train)"
    return _texts_from_dataset(ds, where, column), f"dataset folder {path} ({ds.num_rows} rows)"


def _load_hf(source: str, column: str = DEFAULT_TEXT_COLUMN) -> tuple[str | Documents, str]:
    parts = source[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts):
        raise KvarnError(
            f"{source}: malformed Hugging Face dataset source; use hf:NAME, hf:NAME:CONFIG "
            "or hf:NAME:CONFIG:SPLIT"
        )
    name = parts[0]
    config = parts[1] if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 else "train"
    try:
        import datasets
    except ImportError as e:
        raise KvarnError(f"{source}: needs the datasets package; run `pip install datasets`") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except (ConnectionError, TimeoutError) as e:
        raise KvarnError(
            f"{source}: the Hugging Face hub is unreachable from this machine ({type(e).__name__}); "
            "pass a local .txt/.jsonl file or a save_to_disk folder instead"
        ) from e
    except Exception as e:  # noqa: BLE001 - datasets raises many types; report the first line
        msg = str(e).splitlines()[0] if str(e) else ""
        raise KvarnError(
            f"{source}: cannot load dataset {name!r} config {config!r} split {split!r} "
            f"({type(e).__name__}: {msg}); check the name/config/split, and if the Hugging Face hub "
            "is unreachable pass a local .txt/.jsonl file instead"
        ) from e
    return _texts_from_dataset(ds, source, column), f"{source} ({ds.num_rows} rows)"


def _check_column(column, source: str, flag: str) -> str:
    if not isinstance(column, str) or not column.strip():
        raise KvarnError(f"--text-column {column!r}: must be a column name; e.g. --text-column text")
    column = column.strip()
    if column != DEFAULT_TEXT_COLUMN:
        p = Path(source).expanduser()
        tabular = (source.startswith("hf:") or p.is_dir()
                   or (not source.startswith("wiki:") and p.suffix.lower() in _JSONL_SUFFIXES))
        if not tabular:
            raise KvarnError(f"--text-column {column}: {flag} {source} is plain text, which has no columns; "
                             "--text-column applies to .jsonl files and datasets — drop it")
    return column


def load_text(source: str, text_column: str = DEFAULT_TEXT_COLUMN,
              flag: str = "--text") -> tuple[str | Documents, str]:
    """Load text from ``source`` and return ``(text, description)``.

    ``source`` is ``wiki:first|second|all``, a ``.txt``/``.jsonl`` file, ``hf:NAME[:CONFIG[:SPLIT]]``
    or a ``save_to_disk`` dataset folder; ``text_column`` names the field of a .jsonl file or
    dataset (text, or chat messages: then the result is ``Documents``, see ``render_text``).
    ``flag`` is the option that named the source (in messages). Raises ``KvarnError`` (one line)
    on any problem, including an empty result.
    """
    if not isinstance(source, str) or not source.strip():
        raise KvarnError(f"text source {source!r}: empty; {_SOURCES_HELP}")
    source = source.strip()
    column = _check_column(text_column, source, flag)
    if source.startswith("wiki:"):
        part = source[len("wiki:"):]
        text = wiki_text(part)
        desc = f"{source} (Wikipedia sample from gensim, {_words(text)} words)"
        where = source
    elif source.startswith("hf:"):
        text, desc = _load_hf(source, column)
        where = source
    else:
        path = Path(source).expanduser()
        where = str(path)
        if path.is_dir():
            if not _is_saved_dataset_dir(path):
                raise KvarnError(
                    f"{path}: a folder but not a datasets save_to_disk folder (no state.json or "
                    f"dataset_dict.json); {_SOURCES_HELP}"
                )
            text, desc = _load_saved_dataset(path, column)
        elif path.is_file():
            suffix = path.suffix.lower()
            if suffix in _JSONL_SUFFIXES:
                text = _load_jsonl(path, column)
                desc = f"{path} (jsonl{', chat' if isinstance(text, Documents) else ''})"
            elif suffix in _TEXT_SUFFIXES:
                text = _load_txt(path)
                desc = f"{path} (text)"
            elif suffix in (".yaml", ".yml"):
                raise KvarnError(f"{path}: a .yaml file is a calibration spec, not text; pass it as --calib {path}, "
                                 "or give a .txt/.jsonl file")
            else:
                raise KvarnError(
                    f"{path}: unsupported file type {suffix!r}; use a UTF-8 .txt file (or a file without a "
                    'suffix) or a .jsonl file with one {"text": ...} object per line'
                )
        elif path.exists():
            raise KvarnError(f"{path}: is {kind_of(path)}, not a regular file or folder; {_SOURCES_HELP}")
        else:
            problem = path_problem(path)
            what = "no such file or folder" if problem in (None, "does not exist") else problem
            raise KvarnError(f"{path}: {what}; {_SOURCES_HELP}")
        desc = f"{desc[:-1]}, {_words(text)} words)" if _has_text(text) else desc
    if not _has_text(text):
        raise KvarnError(f"{where}: contains no text; pass a source with some text in it")
    return text, desc


# --------------------------------------------------------------------------------------------------
# calibration specs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibSpec:
    """What to calibrate on: ``num_samples`` windows of ``seq_len`` tokens from ``source``."""

    name: str
    source: str
    num_samples: int
    seq_len: int
    description: str = ""
    text_column: str = DEFAULT_TEXT_COLUMN


DEFAULT_CALIB = "wiki-first-half"
_SPEC_REQUIRED = ("source", "num_samples", "seq_len")
_SPEC_TYPES = {"name": str, "source": str, "num_samples": int, "seq_len": int, "description": str,
               "text_column": str}


def calib_dir() -> Path:
    """The shipped ``calibrate/`` folder (the repository's, or the copy inside an installed wheel)."""
    return shipped_dir("calibrate")


def available_calib_specs() -> list[str]:
    d = calib_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.yaml"))


def _spec_from_mapping(data, where: str, default_name: str, base_dir: Path | None) -> CalibSpec:
    if not isinstance(data, dict):
        raise KvarnError(
            f"{where}: must be a YAML mapping with keys source, num_samples, seq_len "
            f"(got {type(data).__name__}); see calibrate/README.md"
        )
    known = {f.name for f in fields(CalibSpec)}
    for key in data:
        if key not in known:
            raise KvarnError(
                f"{where}: unknown field {key!r}; allowed fields are {', '.join(sorted(known))}"
            )
    for key in _SPEC_REQUIRED:
        if key not in data:
            raise KvarnError(f"{where}: missing field {key!r}; add `{key}: ...` to the file")
    for key, value in data.items():
        want = _SPEC_TYPES[key]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok:
            raise KvarnError(
                f"{where}: field {key!r} must be {'an integer' if want is int else 'a string'} "
                f"(got {value!r}); fix the value in the file"
            )
    for key in ("num_samples", "seq_len"):
        if data[key] < 1:
            raise KvarnError(f"{where}: field {key!r} must be >= 1 (got {data[key]}); fix the value")
    source = data["source"].strip()
    if not source:
        raise KvarnError(f"{where}: field 'source' is empty; set it to wiki:first, a file path or hf:NAME")
    if source.startswith("wiki:") and source[len("wiki:"):] not in WIKI_PARTS:
        raise KvarnError(
            f"{where}: field 'source' {source!r} names an unknown wiki part; "
            "use wiki:first, wiki:second or wiki:all"
        )
    if base_dir is not None and not source.startswith(("wiki:", "hf:")):
        p = Path(source).expanduser()
        if not p.is_absolute() and (base_dir / p).exists():
            source = str((base_dir / p).resolve())
    name = data.get("name", default_name).strip() or default_name
    return CalibSpec(
        name=name,
        source=source,
        num_samples=data["num_samples"],
        seq_len=data["seq_len"],
        description=data.get("description", ""),
        text_column=data.get("text_column", DEFAULT_TEXT_COLUMN).strip() or DEFAULT_TEXT_COLUMN,
    )


def load_calib_spec(name_or_path: str | os.PathLike) -> CalibSpec:
    """Load a calibration spec by name (``calibrate/<name>.yaml``) or from a ``.yaml`` path."""
    arg = str(name_or_path).strip()
    p = Path(arg).expanduser()
    if p.suffix.lower() in (".yaml", ".yml") or os.sep in arg or "/" in arg:
        path = p
        if not path.is_file():
            problem = path_problem(path)
            what = "no such file" if problem in (None, "does not exist") else problem
            raise KvarnError(f"--calib {path}: {what}; give a .yaml spec, a text file or a spec name "
                             f"({', '.join(available_calib_specs()) or 'none in calibrate/'})")
    else:
        path = calib_dir() / f"{arg}.yaml"
        if not path.is_file():
            names = available_calib_specs()
            raise KvarnError(
                f"calibration spec {arg!r}: no {path}; available specs: "
                f"{', '.join(names) if names else 'none'} (or pass a .yaml path)"
            )
    try:
        import yaml
    except ImportError as e:
        raise KvarnError(f"{path}: reading calibration specs needs `pip install pyyaml`") from e
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KvarnError(f"{path}: cannot read it ({e}); check the file is UTF-8 and readable") from e
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise KvarnError(f"{path}: invalid YAML{line}; fix the syntax (see calibrate/README.md)") from e
    return _spec_from_mapping(data, str(path), path.stem, path.parent)


def resolve_calib(
    arg: str | None = None, num_samples: int | None = None, seq_len: int | None = None,
    text_column: str | None = None,
) -> CalibSpec:
    """Turn a ``--calib`` argument into a spec, applying ``--num-samples``/``--seq-len``/``--text-column``
    overrides (the column is checked against the source: plain text has none).

    ``arg`` may be a spec name, a ``.yaml`` path, or directly a text source (``wiki:...``, a
    ``.txt``/``.jsonl`` file, ``hf:NAME...`` or a ``save_to_disk`` folder), in which case the
    default spec's ``num_samples``/``seq_len`` are used. ``None`` means the default spec.
    """
    arg = DEFAULT_CALIB if arg is None else str(arg).strip()
    p = Path(arg).expanduser()
    # an existing file that is not a .yaml spec is a text source whatever its name (a notes file
    # without a suffix must not be parsed as YAML)
    is_source = (
        arg.startswith(("wiki:", "hf:"))
        or p.suffix.lower() in (_JSONL_SUFFIXES | (_TEXT_SUFFIXES - {""}))
        or p.is_dir()
        or (p.is_file() and p.suffix.lower() not in (".yaml", ".yml"))
    )
    if is_source:
        base = load_calib_spec(DEFAULT_CALIB) if (calib_dir() / f"{DEFAULT_CALIB}.yaml").is_file() else None
        spec = CalibSpec(
            name=arg,
            source=arg,
            num_samples=base.num_samples if base else 16,
            seq_len=base.seq_len if base else 512,
        )
    else:
        spec = load_calib_spec(arg)
    changes = {}
    for key, value in (("num_samples", num_samples), ("seq_len", seq_len)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            flag = "--" + key.replace("_", "-")
            raise KvarnError(f"{flag}: must be an integer >= 1 (got {value!r}); pass a positive integer")
        changes[key] = value
    if text_column is not None:
        changes["text_column"] = _check_column(text_column, spec.source, "--calib")
    if changes:
        spec = CalibSpec(**{**asdict(spec), **changes})
    return spec


def spec_hash(spec: CalibSpec) -> str:
    """Short sha256 (12 hex digits) of the canonical JSON of ``spec`` (a field added later enters
    only when it is not at its default, so older specs keep their hash)."""
    fields_ = asdict(spec)
    if fields_.get("text_column") == DEFAULT_TEXT_COLUMN:
        del fields_["text_column"]
    canon = json.dumps(fields_, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# tokenization into windows
# --------------------------------------------------------------------------------------------------

_CHUNK_CHARS = 8000
# split before a newline that is followed by a non-space character: with byte-level BPE tokenizers a
# lone "\n" before a word is its own pre-token, so cutting there does not change the tokenization.
_RE_PARA_BREAK = re.compile(r"\n(?=\S)")


def _chunks(text: str, size: int = _CHUNK_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` chars, right after paragraph-ending newlines."""
    if len(text) <= size:
        return [text]
    out, start = [], 0
    cuts = [m.end() for m in _RE_PARA_BREAK.finditer(text)]
    last = 0
    for c in cuts:
        if c - start > size and last > start:
            out.append(text[start:last])
            start = last
        last = c
    out.append(text[start:])
    return out


def tokenize_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, tokenized in paragraph-aligned chunks."""
    pieces = _chunks(text)
    enc = tokenizer(pieces, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids: list[int] = []
    for row in enc["input_ids"]:
        ids.extend(row)
    return ids


def render_text(tokenizer, text: str | Documents, what: str) -> str:
    """``text`` as one string: ``Documents`` have each chat rendered with the tokenizer's chat
    template (``apply_chat_template(..., tokenize=False)``: its special tokens appear as text and
    are tokenized as themselves), rows joined by a blank line; a ``str`` is returned as it is."""
    if not isinstance(text, Documents):
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise KvarnError(f"{what}: holds chat messages but the model's tokenizer has no chat template; "
                         "use a chat (instruct) model, set tokenizer.chat_template, or give plain text rows")
    out = []
    for doc in text:
        if isinstance(doc, str):
            out.append(doc)
            continue
        try:
            out.append(tokenizer.apply_chat_template(doc, tokenize=False))
        except Exception as e:  # noqa: BLE001 - jinja raises TemplateError, templates raise their own
            first = (str(e).strip().splitlines() or [""])[0][:160]
            raise KvarnError(f"{what}: the model's chat template cannot render a chat ({type(e).__name__}: "
                             f"{first}); check the roles and their order against the template") from e
    return "\n\n".join(out)


def make_windows(tokenizer, text: str | Documents, num_windows: int, seq_len: int, what: str,
                 flags: tuple[str, str] = ("--num-samples", "--seq-len"),
                 seed: int | None = None) -> torch.LongTensor:
    """``[num_windows, seq_len]`` token ids: non-overlapping windows of ``text``.

    With ``seed`` the windows are ``num_windows`` drawn at random (``torch.randperm`` under that
    seed) among all the non-overlapping windows the text holds, in text order; with ``None``
    the first ``num_windows`` in order. If the tokenizer has a BOS token it is the first id of
    every window (so each window holds ``seq_len - 1`` text tokens). ``Documents`` (chats) are
    rendered with the tokenizer's chat template first. ``what`` names the text in error messages
    (e.g. the file); ``flags`` are the command's options for the window count and length (eval:
    ``--num-windows``).
    """
    n_flag, len_flag = flags
    for flag, value in ((n_flag, num_windows), (len_flag, seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KvarnError(f"{what}: {flag} must be an integer >= 1 (got {value!r}); pass a positive integer")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise KvarnError(f"--seed {seed!r}: must be an integer; e.g. --seed 0")
    if isinstance(text, Documents):
        text = render_text(tokenizer, text, what)
    if not isinstance(text, str) or not text.strip():
        raise KvarnError(f"{what}: the text is empty; pass a source with some text in it")
    bos = getattr(tokenizer, "bos_token_id", None)
    body = seq_len - 1 if bos is not None else seq_len
    if body < 1:
        raise KvarnError(
            f"{what}: {len_flag} {seq_len} leaves no room for text after the BOS token; use {len_flag} 2 or more"
        )
    ids = tokenize_text(tokenizer, text)
    need = num_windows * body
    if len(ids) < need:
        formula = f"{n_flag}×({len_flag}−1) = {num_windows}×{body}" if bos is not None else (
            f"{n_flag}×{len_flag} = {num_windows}×{seq_len}"
        )
        raise KvarnError(
            f"{what}: has {len(ids)} tokens, need {formula} = {need}; use a longer text or "
            f"fewer/shorter windows ({n_flag}/{len_flag})"
        )
    available = len(ids) // body
    if seed is None:
        starts = list(range(num_windows))
    else:
        g = torch.Generator().manual_seed(seed % 2**63)
        starts = sorted(torch.randperm(available, generator=g)[:num_windows].tolist())
    stream = torch.tensor(ids[: available * body], dtype=torch.long).view(available, body)
    t = stream[starts]
    if bos is not None:
        t = torch.cat([torch.full((num_windows, 1), int(bos), dtype=torch.long), t], dim=1)
    return t
