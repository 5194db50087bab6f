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
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import KvarnError
from .quant.formats import ALL_BITS, SUPPORTED_TILES, LayerFormat, TensorFormat, bits_per_element, fp16_bytes_per_token, bytes_per_token
from .quant.hadamard import SUPPORTED_HEAD_DIMS
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
        diffs = [f"{k}: recipe {a!r} vs model {b!r}" for k, a, b in
                 ((k, getattr(self.fingerprint, k), getattr(other, k)) for k in asdict(other)) if a != b]
        raise KvarnError(
            f"{recipe_path}: recipe was made for {self.model_id} ({self.fingerprint.describe()}) and does not fit this "
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
    def load(cls, path: str | os.PathLike) -> "Recipe":
        meta, tensors = _read(path, with_tensors=True)
        return _from_parts(path, meta, tensors)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fail(path, what: str, fix: str = "make a new one with `kvarn calibrate MODEL`") -> KvarnError:
    return KvarnError(f"{path}: {what}; {fix}")


def _read(path, with_tensors: bool):
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = in_model_dir(p) if in_model_dir(p).is_file() or not (p / DEFAULT_NAME).exists() else p / DEFAULT_NAME
    if not p.exists():
        raise _fail(p, "no such recipe file", "make one with `kvarn calibrate MODEL` (or pass --recipe PATH)")
    if p.stat().st_size < 8:
        raise _fail(p, "file is empty or truncated, not a safetensors recipe")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else None
    except Exception as e:  # safetensors raises its own error types for bad headers/truncation
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _fail(p, f"not a readable safetensors file ({msg}); it may be truncated or not a recipe")
    if meta.get("format") != FORMAT:
        raise _fail(p, f"safetensors file is not a kvarn recipe (metadata format={meta.get('format')!r})")
    version = meta.get("format_version", "")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise _fail(p, f"bad format_version {version!r}")
    if major > int(FORMAT_VERSION.split(".")[0]):
        raise _fail(p, f"recipe format version {version} is newer than this kvarn supports ({FORMAT_VERSION})",
                    "upgrade kvarn (pip install -U kvarn)")
    try:
        info = json.loads(meta["recipe"])
    except (KeyError, json.JSONDecodeError) as e:
        raise _fail(p, f"recipe metadata is missing or not JSON ({type(e).__name__})")
    return (p, meta, info), tensors


def read_header(path) -> dict:
    """Metadata only (no tensor data is read): for ``kvarn inspect``."""
    (p, meta, info), _ = _read(path, with_tensors=False)
    return {"path": str(p), "format_version": meta["format_version"], "kvarn_version": meta.get("kvarn_version"), **info}


def _from_parts(path, parts, tensors) -> Recipe:
    p, meta, info = parts
    try:
        fp = ModelFingerprint(**{**info["fingerprint"], "layer_types": tuple(info["fingerprint"].get("layer_types", ()))})
        tile, keep = int(info["tile"]), bool(info["keep_first_tile"])
        k_opt, v_opt = dict(info["k_format"]), dict(info["v_format"])
        cand = tuple(int(b) for b in info["candidate_bits"])
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(p, f"recipe metadata field {e} is missing or malformed")
    if tile not in SUPPORTED_TILES:
        raise _fail(p, f"tile={tile} is not supported (use one of {list(SUPPORTED_TILES)})")
    if fp.head_dim not in SUPPORTED_HEAD_DIMS:
        raise _fail(p, f"head_dim={fp.head_dim} is not supported (kvarn supports {list(SUPPORTED_HEAD_DIMS)})")
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
        raise _fail(p, f"unexpected tensor {sorted(extra)[0]} (recipe for {L} layers)")
    for kind in "kv":
        bad = [int(b) for b in stacked[f"{kind}_bits"].flatten().tolist() if int(b) not in ALL_BITS]
        if bad:
            raise _fail(p, f"{kind} bits value {bad[0]} is not one of {list(ALL_BITS)}")
        if not torch.isfinite(stacked[f"{kind}_log_std"]).all():
            raise _fail(p, f"{kind} log_std contains NaN/inf")
    try:
        recipe = Recipe(
            model_id=info.get("model_id", "?"), fingerprint=fp, tile=tile, keep_first_tile=keep,
            k_options=k_opt, v_options=v_opt,
            k_bits=stacked["k_bits"].long(), v_bits=stacked["v_bits"].long(),
            k_log_std=stacked["k_log_std"], v_log_std=stacked["v_log_std"],
            k_err=stacked["k_err"], v_err=stacked["v_err"], candidate_bits=cand,
            calibration=info.get("calibration", {}), budget=info.get("budget", {}),
            created=info.get("created", ""), seed=int(info.get("seed", 0)),
            kvarn_version=meta.get("kvarn_version", "?"), format_version=meta["format_version"],
        )
        recipe.layer_formats()  # validates format options and byte layout
    except KvarnError as e:
        raise _fail(p, f"invalid format: {e}")
    except TypeError as e:
        raise _fail(p, f"invalid format options ({e})")
    return recipe
