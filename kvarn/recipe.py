"""The recipe file: the only code that reads or writes it.

A recipe is a safetensors file (never pickle). Tensors, per layer ``i``:

* ``layers.{i}.k.bits``, ``layers.{i}.v.bits``: int8 ``[H]`` code width per KV head (16 = fp16)
* ``layers.{i}.k.log_std``, ``layers.{i}.v.log_std``: float32 ``[H, D]`` calibrated per-channel
  log-std after the Hadamard rotation (normalization prior / static channel scale)
* ``layers.{i}.k.err``, ``layers.{i}.v.err``: float32 ``[H, nb]`` predicted error per candidate
  width (for reports; the runtime does not need them)

Metadata (text, as safetensors requires): ``format`` = "kvarn-recipe", ``format_version``,
``kvarn_version`` and ``recipe`` = the JSON of everything else (model id and fingerprint, tile,
formats, calibration set, budget, achieved bits, date, seed). Files are written to a temporary
name in the target directory and renamed, so a reader never sees half a recipe.

Loading validates a recipe as data, not just as a parseable file: a recipe that loads is one the
runtimes can serve with finite numbers. Every field has a type and a range; anything else is a
one-line ``KvarnError`` naming the file and the field. Metadata (``int`` never accepts a bool or a
string; a "number" is an int or a finite float):

=====================================  ==========  ================================================
field                                  type        range / rule
=====================================  ==========  ================================================
``format``                             str         ``"kvarn-recipe"``
``format_version``                     str         ``MAJOR.MINOR``; MAJOR <= 1
``kvarn_version``                      str         <= 64 chars (optional)
``recipe``                             str         JSON object, <= 64 KiB (so is every metadata value)
``model_id``                           str         <= 1024 chars (optional)
``fingerprint.model_type``             str         <= 64 chars
``fingerprint.num_layers``             int         1 .. 4096
``fingerprint.num_kv_heads``           int         1 .. 1024
``fingerprint.num_attention_heads``    int         1 .. 16384, a multiple of num_kv_heads
``fingerprint.head_dim``               int         64, 80, 96, 128 or 256 (``SUPPORTED_HEAD_DIMS``)
``fingerprint.hidden_size``            int         1 .. 2**20
``fingerprint.vocab_size``             int         1 .. 2**24
``fingerprint.rope``                   str         JSON text, <= 4096 chars
``fingerprint.layer_types``            list[str]   empty or one entry (<= 64 chars) per layer
``fingerprint_digest``                 str         equals the digest recomputed from the fingerprint
``tile``                               int         64 or 128
``keep_first_tile``                    bool        true/false (the string "false" is refused)
``k_format`` / ``v_format``            object      exactly axis, normalize, hadamard, clip, codec
``  .axis``                            str         "channel" (K) / "token" (V)
``  .normalize``                       str         K: none, tile; V: static, tile, none
``  .hadamard``, ``.clip``             bool
``  .codec``                           str         "rtn" (the only codec with a stored form)
``candidate_bits``                     list[int]   1-5 strictly increasing widths from 1, 2, 3, 4, 8
``calibration``                        object      optional keys: set (str <= 256), source
                                                   (str <= 4096), spec_hash (str <= 64),
                                                   num_samples (int 1 .. 10**6), seq_len (int
                                                   1 .. 2**24), tokens (int 0 .. 2**40),
                                                   objective ("fisher" or "mse")
``budget``                             object      optional: avg_bits (number in (1, 16]),
                                                   compression (number in [1, 16)), tp_sizes
                                                   (1-8 ints in [1, 1024]: tensor-parallel sizes
                                                   whose ranks hold equal bytes per token),
                                                   min_k_bits (int in [1, 16]: no K width in the
                                                   bit tables is below it)
``achieved_bits_per_element``          number      equals the bits recomputed from the bit tables
                                                   (within 1e-4; optional)
``compression``                        number      equals 16 / achieved bits (within 1e-4; optional)
``created``                            str         empty or ISO 8601, <= 64 chars
``seed``                               int         -2**63 .. 2**64 - 1
=====================================  ==========  ================================================

Other keys of ``recipe`` are ignored (a later 1.x may add fields) and never printed. Tensors:
exactly the keys above for ``num_layers`` layers, with the shapes and dtypes above; ``bits`` one
of the recipe's ``candidate_bits`` or 16; ``log_std`` finite and within
[ln 2**-14, ln 65504] = [-9.70, 11.09] — a channel std an fp16 activation can have and the runtime
can divide by (the smallest normal to the largest finite fp16 number, the range the per-tile
normalization multipliers are clamped to); ``err`` finite and >= 0.

Metadata is untrusted text: whatever kvarn prints of it goes through ``errors.printable``
(control characters escaped, length capped).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import KvarnError, printable
from .paths import kind_of, path_problem
from .quant.formats import ALL_BITS, FP16_BITS, LOG_STD_MAX, LOG_STD_MIN, SUPPORTED_TILES, LayerFormat, TensorFormat, bits_per_element, fp16_bytes_per_token, bytes_per_token
from .quant.hadamard import SUPPORTED_HEAD_DIMS
from .quant.rtn import SUPPORTED_BITS
from .quant.scheme import CacheScheme

FORMAT = "kvarn-recipe"
FORMAT_VERSION = "1.0"
DEFAULT_NAME = "kvarn_recipe.safetensors"  # a recipe's file name outside a model folder
# Inside a model folder the recipe lives in a subfolder: vLLM's loader takes every top-level
# *.safetensors of a local folder as weights (a recipe there breaks plain `LLM(dir)`), and neither
# it nor transformers reads subfolders.
MODEL_DIR_RECIPE = Path("kvarn") / "recipe.safetensors"


def in_model_dir(model_dir: str | os.PathLike) -> Path:
    """Where a model folder's recipe lives: ``MODEL/kvarn/recipe.safetensors``."""
    return Path(model_dir) / MODEL_DIR_RECIPE


def is_recipe_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a safetensors file whose metadata says it is a kvarn recipe (header only)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - not readable as safetensors: not a recipe
        return False


def legacy_in_model_dir(model_dir: str | os.PathLike) -> Path | None:
    """``MODEL/kvarn_recipe.safetensors`` (where kvarn 0.1 wrote recipes) when it is a kvarn recipe."""
    p = Path(model_dir) / DEFAULT_NAME
    return p if is_recipe_file(p) else None


def output_path(path: str | os.PathLike) -> Path:
    """Where ``Recipe.save(path)`` writes: a folder means its recipe file (a model folder's
    ``kvarn/recipe.safetensors``, else ``DEFAULT_NAME`` in it)."""
    path = Path(path)
    if path.is_dir():
        return in_model_dir(path) if (path / "config.json").is_file() else path / DEFAULT_NAME
    return path


def legacy_hint(path: Path) -> str:
    """One line: why a recipe at a model folder's top level breaks loading, and the move that fixes it."""
    new = path.parent / MODEL_DIR_RECIPE
    return (f"{path}: a kvarn recipe at the top of a model folder is taken for weights by vLLM's loader; "
            f"move it with `mkdir -p {new.parent} && mv {path} {new}` (kvarn finds it there)")


def _kvarn_version() -> str:
    from . import __version__

    return __version__


@dataclass(frozen=True)
class ModelFingerprint:
    """The shape facts a recipe depends on; two models with the same fingerprint can share one."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    num_attention_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    rope: str  # canonical JSON of the rope parameters
    layer_types: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config) -> "ModelFingerprint":
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = c.num_attention_heads
        rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        if not rope and getattr(c, "rope_theta", None) is not None:
            rope = {"rope_theta": c.rope_theta}
        if isinstance(rope, dict) and all(isinstance(v, dict) for v in rope.values()) and rope:
            rope = {k: rope[k] for k in sorted(rope)}
        return cls(
            model_type=str(getattr(c, "model_type", "")),
            num_layers=int(c.num_hidden_layers),
            num_kv_heads=int(getattr(c, "num_key_value_heads", None) or heads),
            num_attention_heads=int(heads),
            head_dim=int(getattr(c, "head_dim", None) or c.hidden_size // heads),
            hidden_size=int(c.hidden_size),
            vocab_size=int(c.vocab_size),
            rope=json.dumps(rope, sort_keys=True, default=str),
            layer_types=tuple(getattr(c, "layer_types", None) or ()),
        )

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        return f"{self.num_layers} layers, {self.num_kv_heads} KV heads, head_dim {self.head_dim}, {self.model_type}"


@dataclass(frozen=True)
class Recipe:
    """A calibrated cache layout for one model. Tensors: k_bits/v_bits ``[L, H]`` int,
    k_log_std/v_log_std ``[L, H, D]`` float32, k_err/v_err ``[L, H, nb]`` float32."""

    model_id: str
    fingerprint: ModelFingerprint
    tile: int
    keep_first_tile: bool
    k_options: dict
    v_options: dict
    k_bits: torch.Tensor
    v_bits: torch.Tensor
    k_log_std: torch.Tensor
    v_log_std: torch.Tensor
    k_err: torch.Tensor
    v_err: torch.Tensor
    candidate_bits: tuple[int, ...]
    calibration: dict = field(default_factory=dict)
    budget: dict = field(default_factory=dict)
    created: str = ""
    seed: int = 0
    kvarn_version: str = field(default_factory=_kvarn_version)
    format_version: str = FORMAT_VERSION

    # -- derived --------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.fingerprint.num_layers

    def layer_formats(self) -> list[LayerFormat]:
        k_tmpl = TensorFormat((), **self.k_options)
        v_tmpl = TensorFormat((), **self.v_options)
        return [
            LayerFormat(self.fingerprint.head_dim, self.tile, k_tmpl.with_bits(self.k_bits[l].tolist()), v_tmpl.with_bits(self.v_bits[l].tolist()))
            for l in range(self.num_layers)
        ]

    def bytes_per_token(self) -> list[float]:
        return [bytes_per_token(f) for f in self.layer_formats()]

    def bits_per_element(self) -> float:
        return bits_per_element(self.layer_formats())

    def compression(self) -> float:
        return 16.0 / self.bits_per_element()

    def to_scheme(self, name: str = "recipe") -> CacheScheme:
        return CacheScheme(name, self.layer_formats(), self.keep_first_tile, self.k_log_std, self.v_log_std)

    def check_model(self, config, recipe_path: str | os.PathLike = "recipe") -> None:
        """Raise a one-line KvarnError unless ``config`` has this recipe's fingerprint."""
        other = ModelFingerprint.from_config(config)
        if other == self.fingerprint:
            return
        diffs = [f"{k}: recipe {printable(a, 80)} vs model {printable(b, 80)}" for k, a, b in
                 ((k, getattr(self.fingerprint, k), getattr(other, k)) for k in asdict(other)) if a != b]
        raise KvarnError(
            f"{recipe_path}: recipe was made for {printable(self.model_id, 120)} ({printable(self.fingerprint.describe(), 200)}) and does not fit this "
            f"model ({'; '.join(diffs[:3])}); make one for it with `kvarn calibrate MODEL`"
        )

    # -- I/O ------------------------------------------------------------------------------------
    def _meta(self) -> dict:
        return {
            "model_id": self.model_id, "fingerprint": asdict(self.fingerprint),
            "fingerprint_digest": self.fingerprint.digest(), "tile": self.tile,
            "keep_first_tile": self.keep_first_tile, "k_format": self.k_options, "v_format": self.v_options,
            "candidate_bits": list(self.candidate_bits), "calibration": self.calibration, "budget": self.budget,
            "achieved_bits_per_element": round(self.bits_per_element(), 6), "compression": round(self.compression(), 6),
            "created": self.created, "seed": self.seed,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file in the same directory, then rename)."""
        from safetensors.torch import save_file

        path = output_path(path)
        tensors = {}
        for l in range(self.num_layers):
            for kind in "kv":
                tensors[f"layers.{l}.{kind}.bits"] = getattr(self, f"{kind}_bits")[l].to(torch.int8).contiguous()
                tensors[f"layers.{l}.{kind}.log_std"] = getattr(self, f"{kind}_log_std")[l].float().contiguous()
                tensors[f"layers.{l}.{kind}.err"] = getattr(self, f"{kind}_err")[l].float().contiguous()
        meta = {"format": FORMAT, "format_version": self.format_version, "kvarn_version": self.kvarn_version,
                "recipe": json.dumps(self._meta(), sort_keys=True)}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a recipe is meant to be shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, flag: str | None = "--recipe") -> "Recipe":
        """Read and validate a recipe (the rules in the module docstring); every failure is a
        one-line ``KvarnError``. ``flag``: the option that names a recipe in the command being run
        (``--recipe``, vLLM's ``--kvarn-recipe``; None for a positional argument), for the hint."""
        meta, tensors = _read(path, with_tensors=True, flag=flag)
        return _from_parts(path, meta, tensors)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fail(path, what: str, fix: str = "make a new one with `kvarn calibrate MODEL`") -> KvarnError:
    return KvarnError(f"{path}: {what}; {fix}")


# -- validation limits (the table in the module docstring) ----------------------------------------
MAX_META_BYTES = 64 * 1024
_FORMAT_KEYS = ("axis", "normalize", "hadamard", "clip", "codec")
_NORMALIZE = {"k": ("none", "tile"), "v": ("static", "tile", "none")}
_AXIS = {"k": "channel", "v": "token"}
_VERSION = re.compile(r"\d{1,4}\.\d{1,4}")
_HEX = re.compile(r"[0-9a-f]{16}")


class _Fields:
    """Typed reads of one recipe's metadata; every failure names the file and the field."""

    def __init__(self, path):
        self.path = path

    def bad(self, name: str, value, want: str) -> KvarnError:
        kind = "a string" if isinstance(value, str) else "null" if value is None else f"a {type(value).__name__}"
        shown = printable(json.dumps(value[:200], ensure_ascii=False) if isinstance(value, str) else value, 60)
        return _fail(self.path, f"recipe metadata field {name} is {shown} ({kind}), expected {want}; "
                                "the file was edited or damaged")

    def get(self, obj: dict, key: str, name: str, required: bool):
        if key not in obj:
            if required:
                raise _fail(self.path, f"recipe metadata field {name} is missing; the file is incomplete")
            return None
        return obj[key]

    def int(self, obj, key, lo, hi, prefix="", required=True, default=None):
        name = prefix + key
        v = self.get(obj, key, name, required)
        if v is None and not required:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.bad(name, v, f"an integer in [{lo}, {hi}]")
        return v

    def number(self, obj, key, lo, hi, prefix="", required=False, lo_open=False, hi_open=False):
        name = prefix + key
        v = self.get(obj, key, name, required)
        if v is None and not required:
            return None
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            raise self.bad(name, v, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
        return float(v)

    def str(self, obj, key, limit, prefix="", required=True, default="", choices=None):
        name = prefix + key
        v = self.get(obj, key, name, required)
        if v is None and not required:
            return default
        if not isinstance(v, str) or len(v) > limit:
            raise self.bad(name, v, f"a string of at most {limit} characters")
        if choices is not None and v not in choices:
            raise self.bad(name, v, f"one of {list(choices)}")
        return v

    def bool(self, obj, key, prefix=""):
        v = self.get(obj, key, prefix + key, True)
        if not isinstance(v, bool):
            raise self.bad(prefix + key, v, "true or false (a JSON boolean)")
        return v

    def object(self, obj, key, required=True):
        v = self.get(obj, key, key, required)
        if v is None and not required:
            return {}
        if not isinstance(v, dict):
            raise self.bad(key, v, "a JSON object")
        return v


def _locate(path) -> Path:
    """The file ``path`` names: itself, or for a folder its recipe (``kvarn/recipe.safetensors``,
    else ``kvarn_recipe.safetensors``); raises for a folder with none."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (in_model_dir(p), p / DEFAULT_NAME):
            if candidate.exists() or candidate.is_symlink():
                return candidate
        raise _fail(p, f"is a folder with no recipe in it (looked for {MODEL_DIR_RECIPE} and {DEFAULT_NAME})",
                    "give the path of a recipe file, or make one with `kvarn calibrate MODEL`")
    return p


def _read(path, with_tensors: bool, flag: str | None = "--recipe"):
    from safetensors import safe_open

    p = _locate(path)
    problem = path_problem(p)
    if problem == "does not exist":
        hint = f" (or pass {flag} PATH)" if flag else " (or check the path)"
        raise _fail(p, "no such recipe file", f"make one with `kvarn calibrate MODEL`{hint}")
    if problem:
        raise _fail(p, problem, "give the path of a recipe file")
    kind = kind_of(p)
    if kind == "folder":  # e.g. MODEL/kvarn/recipe.safetensors made a folder
        raise _fail(p, "is a folder, not a recipe file", "give the path of the .safetensors file `kvarn calibrate` wrote")
    if kind != "file":
        raise _fail(p, f"is {kind}, not a recipe file", "give the path of the .safetensors file `kvarn calibrate` wrote")
    if p.stat().st_size < 8:
        raise _fail(p, "file is empty or truncated, not a safetensors recipe")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else None
    except Exception as e:  # safetensors raises its own error types for bad headers/truncation
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _fail(p, f"not a readable safetensors file ({printable(msg, 120)}); it may be truncated or not a recipe")
    for key, value in meta.items():
        if len(value) > MAX_META_BYTES:
            raise _fail(p, f"metadata value {printable(key, 40)} is {len(value) / 2**20:.1f} MiB, more than the "
                           f"{MAX_META_BYTES // 1024} KiB a recipe's metadata may hold; the file was not written by kvarn")
    if meta.get("format") != FORMAT:
        raise _fail(p, f"safetensors file is not a kvarn recipe (metadata format={printable(meta.get('format'), 60)})")
    version = meta.get("format_version", "")
    if not _VERSION.fullmatch(version):
        raise _fail(p, f"bad format_version {printable(version, 40)} (expected MAJOR.MINOR)")
    if int(version.split(".")[0]) > int(FORMAT_VERSION.split(".")[0]):
        raise _fail(p, f"recipe format version {version} is newer than this kvarn supports ({FORMAT_VERSION})",
                    "upgrade kvarn (pip install -U kvarn)")
    try:
        info = json.loads(meta["recipe"])
    except (KeyError, json.JSONDecodeError, RecursionError) as e:
        raise _fail(p, f"recipe metadata is missing or not JSON ({type(e).__name__})")
    if not isinstance(info, dict):
        raise _fail(p, f"recipe metadata is JSON {'null' if info is None else type(info).__name__}, expected a JSON "
                       "object; the file was edited or damaged")
    kvarn_version = meta.get("kvarn_version", "?")
    if len(kvarn_version) > 64:
        raise _fail(p, f"metadata kvarn_version {printable(kvarn_version, 40)} is longer than 64 characters")
    return (p, meta, _validate_info(p, info)), tensors


def _validate_info(p, info: dict) -> dict:
    """The metadata fields kvarn uses, type- and range-checked (the table in the module docstring)."""
    f = _Fields(p)
    fpi = f.object(info, "fingerprint")
    pre = "fingerprint."
    fp_fields = dict(
        model_type=f.str(fpi, "model_type", 64, pre),
        num_layers=f.int(fpi, "num_layers", 1, 4096, pre),
        num_kv_heads=f.int(fpi, "num_kv_heads", 1, 1024, pre),
        num_attention_heads=f.int(fpi, "num_attention_heads", 1, 16384, pre),
        head_dim=f.int(fpi, "head_dim", 1, 4096, pre),
        hidden_size=f.int(fpi, "hidden_size", 1, 2**20, pre),
        vocab_size=f.int(fpi, "vocab_size", 1, 2**24, pre),
        rope=f.str(fpi, "rope", 4096, pre),
    )
    if fp_fields["num_attention_heads"] % fp_fields["num_kv_heads"]:
        raise f.bad("fingerprint.num_attention_heads", fp_fields["num_attention_heads"],
                    f"a multiple of num_kv_heads ({fp_fields['num_kv_heads']})")
    if fp_fields["head_dim"] not in SUPPORTED_HEAD_DIMS:
        raise _fail(p, f"head_dim={fp_fields['head_dim']} is not supported (kvarn supports {list(SUPPORTED_HEAD_DIMS)})")
    try:
        json.loads(fp_fields["rope"])
    except (json.JSONDecodeError, RecursionError):
        raise f.bad("fingerprint.rope", fp_fields["rope"], "JSON text of the rope parameters") from None
    types = fpi.get("layer_types", [])
    if not isinstance(types, list) or len(types) not in (0, fp_fields["num_layers"]) or not all(
            isinstance(t, str) and len(t) <= 64 for t in types):
        raise f.bad("fingerprint.layer_types", types, f"an empty list or {fp_fields['num_layers']} strings (one per layer)")
    unknown = sorted(set(fpi) - set(fp_fields) - {"layer_types"})
    if unknown:
        raise _fail(p, f"recipe metadata field fingerprint.{printable(unknown[0], 40)} is not a fingerprint field; "
                       "the file was edited or damaged")
    fp = ModelFingerprint(**fp_fields, layer_types=tuple(types))
    digest = f.str(info, "fingerprint_digest", 64)
    if not _HEX.fullmatch(digest) or digest != fp.digest():
        raise _fail(p, f"fingerprint_digest {printable(digest, 40)} does not match the fingerprint it stands for "
                       f"(recomputed: {fp.digest()}); the file was edited")
    out = {"fingerprint": fp, "fingerprint_digest": digest}
    tile = f.int(info, "tile", 1, 2**16)
    if tile not in SUPPORTED_TILES:
        raise _fail(p, f"tile={tile} is not supported (use one of {list(SUPPORTED_TILES)})")
    out["tile"] = tile
    out["keep_first_tile"] = f.bool(info, "keep_first_tile")
    for kind in "kv":
        key = f"{kind}_format"
        opts = f.object(info, key)
        if set(opts) != set(_FORMAT_KEYS):
            raise f.bad(key, opts, f"an object with exactly the keys {', '.join(_FORMAT_KEYS)}")
        out[key] = {
            "axis": f.str(opts, "axis", 16, key + ".", choices=(_AXIS[kind],)),
            "normalize": f.str(opts, "normalize", 16, key + ".", choices=_NORMALIZE[kind]),
            "hadamard": f.bool(opts, "hadamard", key + "."),
            "clip": f.bool(opts, "clip", key + "."),
            "codec": f.str(opts, "codec", 16, key + ".", choices=("rtn",)),
        }
    cand = f.get(info, "candidate_bits", "candidate_bits", True)
    if (not isinstance(cand, list) or not 1 <= len(cand) <= len(SUPPORTED_BITS)
            or not all(isinstance(b, int) and not isinstance(b, bool) and b in SUPPORTED_BITS for b in cand)
            or any(a >= b for a, b in zip(cand, cand[1:]))):
        raise f.bad("candidate_bits", cand, f"a strictly increasing list of widths from {list(SUPPORTED_BITS)}")
    out["candidate_bits"] = tuple(cand)
    out["model_id"] = f.str(info, "model_id", 1024, required=False, default="?")
    cal = f.object(info, "calibration", required=False)
    pre = "calibration."
    calibration = {
        "set": f.str(cal, "set", 256, pre, required=False, default=None),
        "source": f.str(cal, "source", 4096, pre, required=False, default=None),
        "spec_hash": f.str(cal, "spec_hash", 64, pre, required=False, default=None),
        "num_samples": f.int(cal, "num_samples", 1, 10**6, pre, required=False),
        "seq_len": f.int(cal, "seq_len", 1, 2**24, pre, required=False),
        "tokens": f.int(cal, "tokens", 0, 2**40, pre, required=False),
        "objective": f.str(cal, "objective", 16, pre, required=False, default=None, choices=("fisher", "mse")),
    }
    out["calibration"] = {k: v for k, v in calibration.items() if v is not None}
    bud = f.object(info, "budget", required=False)
    budget = {"avg_bits": f.number(bud, "avg_bits", 1, 16, "budget.", lo_open=True),
              "compression": f.number(bud, "compression", 1, 16, "budget.", hi_open=True)}
    tp = bud.get("tp_sizes")
    if tp is not None:  # the tensor-parallel sizes the allocation is balanced for
        if (not isinstance(tp, list) or not 1 <= len(tp) <= 8
                or any(isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= 1024 for t in tp)):
            raise f.bad("budget.tp_sizes", tp, "a list of 1-8 integers in [1, 1024]")
        budget["tp_sizes"] = list(tp)
    budget["min_k_bits"] = f.int(bud, "min_k_bits", 1, 16, "budget.", required=False)
    out["budget"] = {k: v for k, v in budget.items() if v is not None}
    out["achieved_bits_per_element"] = f.number(info, "achieved_bits_per_element", 0, 16)
    out["compression"] = f.number(info, "compression", 1, 16)
    created = f.str(info, "created", 64, required=False, default="")
    if created:
        try:
            datetime.datetime.fromisoformat(created)
        except ValueError:
            raise f.bad("created", created, "an ISO 8601 date or an empty string") from None
    out["created"] = created
    out["seed"] = f.int(info, "seed", -(2**63), 2**64 - 1, required=False, default=0)
    return out


def read_header(path, flag: str | None = "--recipe") -> dict:
    """Metadata only (no tensor data is read), validated: for ``kvarn inspect``."""
    (p, meta, info), _ = _read(path, with_tensors=False, flag=flag)
    fp = info["fingerprint"]
    return {"path": str(p), "format_version": meta["format_version"], "kvarn_version": meta.get("kvarn_version", "?"),
            **info, "fingerprint": {**asdict(fp), "layer_types": list(fp.layer_types)}}


def _from_parts(path, parts, tensors) -> Recipe:
    p, meta, info = parts
    fp, cand = info["fingerprint"], info["candidate_bits"]
    L, H, D, nb = fp.num_layers, fp.num_kv_heads, fp.head_dim, len(cand)
    expect = {"bits": ((H,), torch.int8), "log_std": ((H, D), torch.float32), "err": ((H, nb), torch.float32)}
    stacked = {}
    for kind in "kv":
        for name, (shape, dtype) in expect.items():
            rows = []
            for l in range(L):
                key = f"layers.{l}.{kind}.{name}"
                t = tensors.get(key)
                if t is None:
                    raise _fail(p, f"tensor {key} is missing (recipe for {L} layers)")
                if tuple(t.shape) != shape or t.dtype != dtype:
                    raise _fail(p, f"tensor {key} has shape {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
                rows.append(t)
            stacked[f"{kind}_{name}"] = torch.stack(rows)
    extra = set(tensors) - {f"layers.{l}.{k}.{n}" for l in range(L) for k in "kv" for n in expect}
    if extra:
        raise _fail(p, f"unexpected tensor {printable(sorted(extra)[0], 80)} (recipe for {L} layers)")
    allowed = set(cand) | {FP16_BITS}
    floor = info["budget"].get("min_k_bits")
    if floor is not None and bool((stacked["k_bits"] < floor).any()):
        raise _fail(p, f"k bits value {int(stacked['k_bits'].min())} is below the recipe's budget.min_k_bits {floor}; "
                       "the file was edited")
    for kind in "kv":
        bits = stacked[f"{kind}_bits"]
        bad = [int(b) for b in bits.flatten().tolist() if int(b) not in allowed]
        if bad:
            where = "" if bad[0] in ALL_BITS else f" (kvarn stores {list(ALL_BITS)})"
            raise _fail(p, f"{kind} bits value {bad[0]} is not one of the recipe's widths {sorted(allowed)}{where}")
        log_std = stacked[f"{kind}_log_std"]
        if not torch.isfinite(log_std).all():
            raise _fail(p, f"{kind} log_std contains NaN/inf")
        lo, hi = float(log_std.min()), float(log_std.max())
        if lo < LOG_STD_MIN or hi > LOG_STD_MAX:
            worst = lo if lo < LOG_STD_MIN else hi
            l, h, _ = (log_std == worst).nonzero()[0].tolist()
            raise _fail(p, f"{kind} log_std prior {worst:.4g} (layer {l}, head {h}) is outside the range a channel "
                           f"std of fp16 activations can have, [{LOG_STD_MIN:.2f}, {LOG_STD_MAX:.2f}] "
                           f"(exp: 6.1e-05 .. 65504); the file was edited or damaged")
        err = stacked[f"{kind}_err"]
        if not torch.isfinite(err).all() or bool((err < 0).any()):
            raise _fail(p, f"{kind} err (predicted error per width) has NaN/inf or negative values; errors are finite "
                           "and >= 0")
    try:
        recipe = Recipe(
            model_id=info["model_id"], fingerprint=fp, tile=info["tile"], keep_first_tile=info["keep_first_tile"],
            k_options=info["k_format"], v_options=info["v_format"],
            k_bits=stacked["k_bits"].long(), v_bits=stacked["v_bits"].long(),
            k_log_std=stacked["k_log_std"], v_log_std=stacked["v_log_std"],
            k_err=stacked["k_err"], v_err=stacked["v_err"], candidate_bits=cand,
            calibration=info["calibration"], budget=info["budget"],
            created=info["created"], seed=info["seed"],
            kvarn_version=meta.get("kvarn_version", "?"), format_version=meta["format_version"],
        )
        achieved = recipe.bits_per_element()  # validates format options and byte layout
    except KvarnError as e:
        raise _fail(p, f"invalid format: {e}")
    for key, claimed, actual in (("achieved_bits_per_element", info["achieved_bits_per_element"], achieved),
                                 ("compression", info["compression"], 16.0 / achieved)):
        if claimed is not None and abs(claimed - actual) > 1e-4 * max(1.0, actual):
            raise _fail(p, f"recipe metadata says {key} {claimed:g} but its bit tables give {actual:.6g}; "
                           "the file was edited")
    return recipe
