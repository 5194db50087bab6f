"""kvarn's Python API: ``calibrate``, ``evaluate``, ``inspect``. All orchestration lives here.

Data flows one way: model → capture → stats → allocation → recipe; ``evaluate`` reads a recipe back
through the same reference reader the runtime is checked against.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import preflight
from .errors import KvarnError, printable
from .outputs import check_output, is_png
from .paths import shipped_dir
from .recipe import (DEFAULT_NAME, ModelFingerprint, Recipe, in_model_dir, is_recipe_file, legacy_hint,
                     legacy_in_model_dir, output_path, read_header)
from .report import provenance, strict

logger = logging.getLogger(__name__)

DEFAULT_TEXT = "wiki:second"
DEFAULT_CALIB = "wiki-first-half"
DEFAULT_AVG_BITS = 3.0
# The clipping search for the values only: clipped keys lose long-context retrieval (passkey at 4k),
# clipped values cost little of it and buy perplexity (bench/NOTES.md, "the clip default").
DEFAULT_CLIP = "values"
BASELINES = ("kvarn-k4v2-g128", "int4-per-token-head", "kivi-2", "fp8-e4m3")


def _model_shape(model):
    fp = ModelFingerprint.from_config(model.config)
    return fp.num_layers, fp.num_kv_heads, fp.head_dim


def _config_shape(config, name: str) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) from a config; one line when it is not a decoder config."""
    try:
        fp = ModelFingerprint.from_config(config)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as e:
        raise KvarnError(f"model {name}: its config has no attention shape kvarn can read ({type(e).__name__}: "
                         f"{printable(str(e), 120)}); kvarn needs a decoder-only causal LM") from None
    return fp.num_layers, fp.num_kv_heads, fp.head_dim


def _is_spec(model) -> bool:
    return model is None or isinstance(model, (str, os.PathLike))


def _model_folder(model) -> str | None:
    """The folder a model comes from: the argument itself, or a model object's ``name_or_path``."""
    if _is_spec(model):
        return None if model is None else str(model)
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return name if isinstance(name, str) and name else None


def _open_model(model, tokenizer, loaded, device, dtype):
    """``loaded`` (a ``LoadedModel``), or a model object wrapped with its tokenizer, or None when
    ``model`` is a path or id to load after the checks."""
    from .models import wrap_model

    if loaded is not None:
        return loaded
    if not _is_spec(model):
        return wrap_model(model, tokenizer, device=device, dtype=dtype)
    return None


def _load(model, tokenizer, config, device, dtype, revision, trust_remote_code, device_map=None):
    from .models import load_model

    lm = load_model(model, dtype=dtype, device=device, revision=revision, trust_remote_code=trust_remote_code,
                    config=config, device_map=device_map)
    if tokenizer is not None:
        lm.tokenizer = tokenizer
    logger.info("kvarn: loaded %s (%s) as %s on %s", lm.model_id, lm.source, str(lm.model.dtype).removeprefix("torch."),
                lm.model.device)
    return lm


def _run_info(lm, revision) -> dict:
    return {"model_source": lm.source, "revision": revision, "device": str(lm.model.device),
            "dtype": str(lm.model.dtype).removeprefix("torch.")}


def default_recipe_path(model_spec: str | None) -> Path:
    """Beside the checkpoint when the model is a directory (``MODEL/kvarn/recipe.safetensors``, where
    weight loaders do not look), else in the working directory."""
    if model_spec and Path(model_spec).is_dir():
        return in_model_dir(model_spec)
    return Path(DEFAULT_NAME)


SHIPPED_RECIPES = shipped_dir("recipes")  # the repository's recipes/, or the copy inside the wheel
EMBEDDED_RECIPE = SHIPPED_RECIPES / "smollm2-135m-instruct.safetensors"


def find_recipe(model_spec: str | None) -> Path | None:
    """The recipe that ships with a model: ``MODEL/kvarn/recipe.safetensors`` for a directory (or,
    with a warning, the old top-level ``MODEL/kvarn_recipe.safetensors``), the one in ``recipes/``
    for the embedded model; None if there is none."""
    from .models import EMBEDDED_MODEL

    if model_spec and Path(model_spec).is_dir():
        p = in_model_dir(model_spec)
        if p.exists():
            return p
        old = legacy_in_model_dir(model_spec)
        if old is not None:
            logger.warning("kvarn: %s", legacy_hint(old))
        return old
    if model_spec in (None, EMBEDDED_MODEL):
        return EMBEDDED_RECIPE if EMBEDDED_RECIPE.exists() else None
    return None


@dataclass
class CalibrationReport:
    recipe_path: str
    model_id: str
    calibration: dict
    budget: dict
    bits_per_element: float
    compression: float
    predicted_error: float
    seconds: float
    k_bits_mean: float
    v_bits_mean: float
    provenance: dict = field(default_factory=dict)


def calibrate(
    model=None, calib: str | None = None, num_samples: int | None = None,
    seq_len: int | None = None, avg_bits: float | None = None, compression: float | None = None,
    output: str | os.PathLike | None = None, tile: int = 128, keep_first_tile: bool = True,
    objective: str = "fisher", k_normalize: str = "none", v_normalize: str = "static",
    clip: bool | str = DEFAULT_CLIP, seed: int = 0, progress: bool = True, loaded=None, overwrite: bool = False,
    tokenizer=None, device="auto", dtype="auto", revision: str | None = None, trust_remote_code: bool = False,
    text_column: str | None = None, tp_size: int = 1, min_k_bits: int | None = None, device_map: str | None = None,
) -> tuple[Recipe, CalibrationReport]:
    """Calibrate ``model`` on a calibration set and write a recipe.

    Lifecycle: check everything the flags and the model's config allow → load the model →
    tokenize the calibration set into windows (``num_samples`` drawn under ``seed`` among all the
    text's non-overlapping windows) → capture streaming K/V statistics and per-candidate
    attention-output errors → allocate K/V bits per layer and head under the budget (``avg_bits``
    bits/element including scales, or ``compression`` vs fp16) → write the recipe atomically.

    ``model``: a path or model id (loaded with ``device``, ``dtype``, ``revision``,
    ``trust_remote_code``, as the CLI's flags), or a transformers model object with its
    ``tokenizer``, used where and as it is (as llm-compressor's ``oneshot`` takes them).
    ``loaded`` (a ``LoadedModel``) skips loading too. ``text_column``: the field of a .jsonl file or
    dataset (text, or chat ``messages`` rendered with the model's chat template).
    ``tp_size`` > 1 balances the budget over the KV heads of each tensor-parallel rank (vLLM's split)
    in every layer, so every rank holds the same bytes per token; recorded in ``budget.tp_sizes``.
    ``clip``: the MSE-optimal clipping search for keys and values (True), one of them ("keys",
    "values") or neither (False: min/max ranges); by default the values only (``DEFAULT_CLIP``):
    clipped keys cost retrieval at long context. ``min_k_bits`` (one of 2, 3, 4, 8; None: no floor): no key is stored narrower, the values take
    the rest of the budget; recorded in ``budget.min_k_bits``. ``device_map``: load the model spread
    over the devices by accelerate (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``), for
    models larger than one device; a model object already dispatched that way is used as it is.
    The statistics stream (nothing per token is kept), so host memory does not grow with the text.
    """
    from .allocation import allocate_bits
    from .capture import CANDIDATE_BITS, CaptureConfig, capture_kv
    from .data import resolve_calib, spec_hash, load_text, make_windows
    from .models import check_device_map, load_config, resolve_device, resolve_dtype
    from .parallel import head_groups_for_tp
    from .quant.formats import SUPPORTED_TILES, TensorFormat
    from .stats import compute_stats

    t0 = time.time()
    loaded = _open_model(model, tokenizer, loaded, device, dtype)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise KvarnError(f"--seed {seed!r}: must be an integer; e.g. --seed 0")
    check_device_map(device_map, device)
    if device_map is not None and loaded is not None:
        raise KvarnError(f"device_map={device_map!r}: a model object is used where it is; dispatch it yourself "
                         "(accelerate.dispatch_model or from_pretrained(device_map=...)) and leave device_map unset")
    # Everything checkable is checked before any weights load (issue 10): output path, budget,
    # tile, calibration spec, then from the model's config alone head_dim, context and memory.
    folder = _model_folder(model)
    out_path = check_output(output_path(output or default_recipe_path(folder)), flag="-o/--output",
                            what="kvarn recipe", is_ours=is_recipe_file, overwrite=overwrite)
    avg_bits, budget_flag = preflight.budget_bits(avg_bits, compression, DEFAULT_AVG_BITS)
    if tile not in SUPPORTED_TILES:
        raise KvarnError(f"--tile {tile} is not supported; use one of {list(SUPPORTED_TILES)}")
    spec = resolve_calib(calib or DEFAULT_CALIB, num_samples=num_samples, seq_len=seq_len, text_column=text_column)
    where = f"--seq-len {spec.seq_len}" if seq_len is not None else f"calibration set {spec.name} (seq_len {spec.seq_len})"
    if spec.seq_len <= tile * (2 if keep_first_tile else 1):
        raise KvarnError(
            f"{where}: too short to read any quantized tile "
            f"(tile {tile}{', first tile kept fp16' if keep_first_tile else ''}); use --seq-len {tile * 4} or more"
        )
    config = loaded.model.config if loaded is not None else load_config(model, revision, trust_remote_code)
    name = loaded.model_id if loaded is not None else (model or "the embedded model")
    D = _config_shape(config, name)[2]
    preflight.check_attention(config, name, D)
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise KvarnError(f"--tp-size {tp_size!r}: must be an integer >= 1")
    head_groups = head_groups_for_tp(_config_shape(config, name)[1], tp_size) if tp_size > 1 else None
    if loaded is None:
        dev, dt = resolve_device(device), resolve_dtype(dtype, config)
    else:
        dev, dt = loaded.model.device, loaded.model.dtype
    if device_map is None:  # a map spreads the model: no one device's memory to check against
        preflight.check_window(config, spec.seq_len, where, backward=True, weights_loaded=loaded is not None,
                               device=dev, bytes_per_param=dt.itemsize)
    if clip not in (True, False, "keys", "values"):
        raise KvarnError(f"--clip {clip!r}: must be both, keys, values or none")
    k_fmt = TensorFormat((), "channel", k_normalize, clip=clip in (True, "keys"))
    v_fmt = TensorFormat((), "token", v_normalize, clip=clip in (True, "values"))
    min_bits = preflight.min_bits_per_element(k_fmt, v_fmt, tile, D, CANDIDATE_BITS)
    preflight.check_reachable(avg_bits, budget_flag, min_bits,
                              f"{min(CANDIDATE_BITS)}-bit codes with their fp16 scales, head_dim {D}, tile {tile}")
    preflight.check_key_floor(min_k_bits, CANDIDATE_BITS, avg_bits, budget_flag, k_fmt, v_fmt, tile, D)
    text, desc = load_text(spec.source, spec.text_column, flag="--calib")
    torch.manual_seed(seed)
    lm = loaded or _load(model, tokenizer, config, device, dtype, revision, trust_remote_code, device_map)
    L, H, D = _model_shape(lm.model)
    windows = make_windows(lm.tokenizer, text, spec.num_samples, spec.seq_len, f"calibration set {spec.name} ({desc})",
                           seed=seed)
    logger.info("kvarn: calibrating on %d windows x %d tokens of %s, drawn under seed %d", spec.num_samples,
                spec.seq_len, desc, seed)
    cfg = CaptureConfig(tile=tile, keep_first_tile=keep_first_tile, k=k_fmt, v=v_fmt)
    cap = capture_kv(lm.model, windows, cfg, progress=progress)
    stats = compute_stats(cap, objective)
    alloc = allocate_bits(stats.k_err, stats.v_err, stats.candidate_bits, k_fmt, v_fmt, tile, D, avg_bits,
                          head_groups=head_groups, min_k_bits=min_k_bits)
    budget = {"avg_bits": avg_bits} if compression is None else {"compression": compression, "avg_bits": avg_bits}
    if tp_size > 1:
        budget["tp_sizes"] = [tp_size]
    if min_k_bits is not None:
        budget["min_k_bits"] = min_k_bits
    recipe = Recipe(
        model_id=lm.model_id, fingerprint=ModelFingerprint.from_config(lm.model.config), tile=tile,
        keep_first_tile=keep_first_tile, k_options=k_fmt.options(), v_options=v_fmt.options(),
        k_bits=alloc.k_bits, v_bits=alloc.v_bits, k_log_std=stats.k_log_std, v_log_std=stats.v_log_std,
        k_err=stats.k_err, v_err=stats.v_err, candidate_bits=stats.candidate_bits,
        calibration={"set": spec.name, "source": spec.source, "spec_hash": spec_hash(spec),
                     "num_samples": spec.num_samples, "seq_len": spec.seq_len, "tokens": stats.tokens,
                     "objective": objective},
        budget=budget, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), seed=seed,
    )
    path = recipe.save(out_path)
    report = CalibrationReport(
        recipe_path=str(path), model_id=lm.model_id, calibration=recipe.calibration, budget=budget,
        bits_per_element=recipe.bits_per_element(), compression=recipe.compression(),
        predicted_error=alloc.predicted_error, seconds=time.time() - t0,
        k_bits_mean=float(alloc.k_bits.float().mean()), v_bits_mean=float(alloc.v_bits.float().mean()),
        provenance=provenance(seed, **_run_info(lm, revision)),
    )
    return recipe, report


# ---------------------------------------------------------------------------------------------
@dataclass
class MethodResult:
    method: str
    bits_per_element: float
    compression: float
    fp16_tokens_per_seq: int
    ppl: float
    delta_ppl_pct: float
    delta_ppl_pct_se: float
    kl: float
    kl_se: float
    top1: float
    top1_se: float
    seconds: float
    recipe_path: str | None = None  # the file a recipe row was read from (None for the presets)


@dataclass
class EvalReport:
    model_id: str
    text: str
    num_windows: int
    seq_len: int
    recipe: str | None
    results: list[MethodResult] = field(default_factory=list)
    seconds: float = 0.0
    seed: int | None = None
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready: a value that is not a finite number (a standard error over one window) is None."""
        return strict(asdict(self))


def recipe_labels(paths: list) -> list[str]:
    """One row name per recipe: ``recipe (NAME)``, or with as many parent folders as it takes to
    tell recipes of the same file name apart (``recipe (a/kvarn_recipe.safetensors)``). The same
    file given twice is refused."""
    resolved = [Path(p).expanduser().resolve() for p in paths]
    for i, r in enumerate(resolved):
        if r in resolved[:i]:
            raise KvarnError(f"--recipe {paths[i]}: given twice; pass each recipe once")
    parts = [r.parts for r in resolved]
    labels = []
    for i, ps in enumerate(parts):
        n = 1
        while n < len(ps) and any(q[-n:] == ps[-n:] for j, q in enumerate(parts) if j != i):
            n += 1
        labels.append(f"recipe ({'/'.join(ps[-n:])})")
    return labels


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


_LOGIT_CHUNK = 1024  # positions per lm-head chunk: [chunk, vocab] float32 temporaries, not [T, vocab]


def _window_metrics(model, ids: torch.Tensor, targets: torch.Tensor, base: list | None):
    """Mean NLL, mean KL(base ‖ model) and top-1 agreement with ``base`` over one window ``ids [T]``.

    The lm head and the log-softmax run on chunks of ``_LOGIT_CHUNK`` positions of the final hidden
    states (a causal LM's logits at one position depend only on its hidden state), so no ``[T, vocab]``
    tensor but the reference's own log-probabilities (``base``: the fp16 pass's, a list of chunks,
    returned as the 4th value when ``base`` is None) is ever held. Models without a separable
    decoder and head fall back to the full logits.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cap = getattr(_text_config(model.config), "final_logit_softcapping", None)
    n = len(targets)
    if decoder is not None and head is not None:
        hidden = decoder(input_ids=ids[None]).last_hidden_state[0, :n]
        logits_of = lambda a, b: head(hidden[a:b]).float()  # noqa: E731
    else:
        logits = model(ids[None]).logits[0, :n]
        logits_of = lambda a, b: logits[a:b].float()  # noqa: E731
    nll = kl = top1 = 0.0
    chunks = []
    for i, a in enumerate(range(0, n, _LOGIT_CHUNK)):
        b = min(a + _LOGIT_CHUNK, n)
        z = logits_of(a, b)
        if cap:
            z = torch.tanh(z / cap) * cap
        logp = torch.log_softmax(z, dim=-1)
        ref = logp if base is None else base[i]
        nll += float(-logp.gather(-1, targets[a:b, None]).sum())
        kl += float((ref.exp() * (ref - logp)).sum())
        top1 += float((ref.argmax(-1) == logp.argmax(-1)).sum())
        if base is None:
            chunks.append(logp)
    mean = lambda x: torch.tensor(x / n, dtype=torch.float64)  # noqa: E731
    return mean(nll), mean(kl), mean(top1), chunks


def _se(x: torch.Tensor) -> float:
    return float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def evaluate(
    model=None, recipe: str | os.PathLike | list | None = None, text: str = DEFAULT_TEXT,
    num_windows: int = 8, seq_len: int = 1024, methods: list[str] | None = None,
    progress: bool = True, loaded=None, tokenizer=None, device="auto", dtype="auto",
    revision: str | None = None, trust_remote_code: bool = False, text_column: str = "text", seed: int = 0,
) -> EvalReport:
    """Perplexity, KL(fp16 ‖ method) and top-1 agreement with fp16 on held-out text, for fp16,
    the recipe(s) (a path or a list of paths) and the baselines, each read the way a runtime reads
    its cache. Windows are evaluated one at a time against their own fp16 pass, so memory stays at
    one window's logits per method; they are ``num_windows`` drawn under ``seed`` among all the
    text's non-overlapping windows of ``seq_len`` tokens, which must be long enough for a query to
    read a quantized tile of every method. ``seed=None``: the first windows of the text, in order
    (how the README's accuracy table was measured, before windows were drawn).

    ``model``: a path or model id (loaded with ``device``, ``dtype``, ``revision``,
    ``trust_remote_code``), or a transformers model object with its ``tokenizer`` (as lm-eval's
    ``HFLM(pretrained=model, tokenizer=...)``), used where and as it is; ``loaded`` (a
    ``LoadedModel``) too. ``text_column``: as in ``calibrate``."""
    from tqdm.auto import tqdm

    from .data import load_text, make_windows
    from .model_hook import attached
    from .models import load_config, resolve_device, resolve_dtype
    from .quant.scheme import PRESETS, SchemeAttention, preset_scheme

    t0 = time.time()
    loaded = _open_model(model, tokenizer, loaded, device, dtype)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise KvarnError(f"--seed {seed!r}: must be an integer; e.g. --seed 0")
    # before any weights load: the flags, the recipes (and that they fit the model's config), the
    # window against the model's context and this machine's memory, the text
    for flag, value in (("--num-windows", num_windows), ("--seq-len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KvarnError(f"{flag} {value!r}: must be an integer >= 1; pass a positive integer")
    recipe_paths = [] if recipe is None else [recipe] if isinstance(recipe, (str, os.PathLike)) else list(recipe)
    labels = recipe_labels(recipe_paths)
    recipes = [(path, Recipe.load(path)) for path in recipe_paths]
    for path, r in recipes:
        if r.calibration.get("source") == text:
            raise KvarnError(f"--text {text}: this is the calibration text of {path}; evaluate on held-out text (e.g. wiki:second)")
    names = list(methods) if methods is not None else list(BASELINES)
    for name in names:
        if name not in PRESETS:
            raise KvarnError(f"--methods: unknown method {printable(name, 60)}; valid methods are {list(PRESETS)}")
    config = loaded.model.config if loaded is not None else load_config(model, revision, trust_remote_code)
    model_name = loaded.model_id if loaded is not None else (model or "the embedded model")
    L, H, D = _config_shape(config, model_name)
    preflight.check_attention(config, model_name, D, rotates=any(n.startswith("kvarn-") for n in names))
    for path, r in recipes:
        r.check_model(config, path)
    schemes = {"fp16": None}
    for label, (path, r) in zip(labels, recipes):
        schemes[label] = r.to_scheme("recipe")
    for name in names:
        schemes[name] = preset_scheme(name, L, H, D)
    preflight.check_reads_quantized(seq_len, [(n, s.tile, s.keep_first_tile) for n, s in schemes.items() if s is not None])
    if loaded is None:
        dev, dt = resolve_device(device), resolve_dtype(dtype, config)
    else:
        dev, dt = loaded.model.device, loaded.model.dtype
    preflight.check_window(config, seq_len, f"--seq-len {seq_len}", backward=False, weights_loaded=loaded is not None,
                           device=dev, bytes_per_param=dt.itemsize)
    body, desc = load_text(text, text_column)
    lm = loaded or _load(model, tokenizer, config, device, dtype, revision, trust_remote_code)
    windows = make_windows(lm.tokenizer, body, num_windows, seq_len, f"--text {text} ({desc})",
                           flags=("--num-windows", "--seq-len"), seed=seed)
    logger.info("kvarn: evaluating %d methods on %d windows x %d tokens of %s, drawn under seed %s", len(schemes),
                num_windows, seq_len, desc, seed)
    per = {name: {"nll": [], "kl": [], "top1": [], "sec": 0.0} for name in schemes}
    softcap = getattr(_text_config(lm.model.config), "attn_logit_softcapping", None)
    bar = tqdm(total=len(windows) * len(schemes), desc="evaluating", unit="pass", disable=not progress)
    with torch.no_grad():
        for w in windows:
            w = w.to(lm.model.device)
            targets = w[1:]
            base = None
            for name, scheme in schemes.items():
                ts = time.time()
                with attached(lm.model, SchemeAttention(scheme, softcap=softcap)):
                    nll, kl, top1, logp = _window_metrics(lm.model, w, targets, base)
                if base is None:
                    base = logp
                per[name]["nll"].append(nll)
                per[name]["kl"].append(kl)
                per[name]["top1"].append(top1)
                per[name]["sec"] += time.time() - ts
                bar.update(1)
    bar.close()
    report = EvalReport(lm.model_id, f"{text} ({desc})", num_windows, seq_len, ", ".join(str(p) for p in recipe_paths) or None,
                        seed=seed, provenance=provenance(seed, **_run_info(lm, revision)))
    paths = {label: str(path) for label, path in zip(labels, recipe_paths)}
    base_nll = torch.stack(per["fp16"]["nll"])
    for name, scheme in schemes.items():
        nll = torch.stack(per[name]["nll"])
        d = nll - base_nll
        kl, top = torch.stack(per[name]["kl"]), torch.stack(per[name]["top1"])
        bits = 16.0 if scheme is None else scheme.bits_per_element()
        report.results.append(MethodResult(
            method=name,
            bits_per_element=bits, compression=16.0 / bits,
            fp16_tokens_per_seq=0 if scheme is None else scheme.fp16_tokens_per_sequence(),
            ppl=float(nll.mean().exp()), delta_ppl_pct=100 * float(torch.expm1(d.mean())),
            delta_ppl_pct_se=100 * _se(d), kl=float(kl.mean()), kl_se=_se(kl),
            top1=float(top.mean()), top1_se=_se(top), seconds=per[name]["sec"], recipe_path=paths.get(name),
        ))
    report.seconds = time.time() - t0
    return report


@dataclass
class PasskeyResult:
    method: str
    bits_per_element: float
    context: int
    trials: int
    correct: int
    accuracy: float
    accuracy_se: float
    by_depth: dict
    seconds: float


@dataclass
class PasskeyReport:
    model_id: str
    text: str
    contexts: list
    trials: int
    depths: list
    recipe: str | None
    chat_template: bool
    mean_prompt_tokens: dict
    results: list[PasskeyResult] = field(default_factory=list)
    seconds: float = 0.0
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return strict(asdict(self))


PASSKEY_METHODS = ("kvarn-k4v2-g128", "turboquant-k3v4-nc", "fp8-e4m3")


def evaluate_passkey(
    model: str | None = None, recipe: str | os.PathLike | list | None = None, text: str = DEFAULT_TEXT,
    contexts: list[int] | None = None, trials: int = 10, methods: list[str] | None = None, seed: int = 0,
    progress: bool = True, loaded=None,
) -> PasskeyReport:
    """Passkey retrieval accuracy per method and context (``kvarn.passkey``): ``trials`` prompts per
    context, the needle's depth cycling through ``kvarn.passkey.DEPTHS``, the same prompts for every
    method; fp16's own accuracy is the ceiling. ± is the binomial standard error."""
    from tqdm.auto import tqdm

    from . import passkey as pk
    from .data import load_text
    from .models import load_config, load_model
    from .quant.scheme import PRESETS, preset_scheme

    t0 = time.time()
    contexts = [2048, 4096, 8192] if contexts is None else list(contexts)
    if not contexts or any(isinstance(c, bool) or not isinstance(c, int) or c < 256 for c in contexts):
        raise KvarnError(f"--contexts {','.join(map(str, contexts))}: must be integers >= 256 (tokens per prompt), e.g. --contexts 2048,4096")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise KvarnError(f"--trials {trials!r}: must be an integer >= 1; pass a positive integer")
    recipe_paths = [] if recipe is None else [recipe] if isinstance(recipe, (str, os.PathLike)) else list(recipe)
    recipes = [(path, Recipe.load(path)) for path in recipe_paths]
    names = list(methods) if methods is not None else list(PASSKEY_METHODS)
    for name in names:
        if name not in PRESETS:
            raise KvarnError(f"--methods: unknown method {printable(name, 60)}; valid methods are {list(PRESETS)}")
    config = loaded.model.config if loaded is not None else load_config(model)
    L, H, D = _config_shape(config, loaded.model_id if loaded is not None else (model or "the embedded model"))
    for path, r in recipes:
        r.check_model(config, path)
    for c in contexts:
        preflight.check_window(config, c + pk.MAX_NEW_TOKENS, f"--contexts {c}", backward=False,
                               weights_loaded=loaded is not None, device=None if loaded is None else loaded.model.device)
    body, desc = load_text(text)
    lm = loaded or load_model(model)
    sentences = pk.filler_sentences(body)
    if len(sentences) < 50:
        raise KvarnError(f"--text {text}: only {len(sentences)} short sentences to use as filler; pass a longer text")
    builder = pk.PromptBuilder(lm.tokenizer, sentences)
    schemes = {"fp16": None}
    for label, (path, r) in zip(recipe_labels([p for p, _ in recipes]), recipes):
        schemes[label] = r.to_scheme("recipe")
    for name in names:
        schemes[name] = preset_scheme(name, L, H, D)
    softcap = getattr(_text_config(lm.model.config), "attn_logit_softcapping", None)
    rng = random.Random(seed)
    prompts = {c: [builder.build(c, pk.DEPTHS[i % len(pk.DEPTHS)], rng) for i in range(trials)] for c in contexts}
    report = PasskeyReport(lm.model_id, f"{text} ({desc})", contexts, trials, list(pk.DEPTHS),
                           ", ".join(str(p) for p in recipe_paths) or None, builder.chat,
                           {c: sum(len(p.ids) for p in ps) / len(ps) for c, ps in prompts.items()},
                           provenance=provenance(seed, model=lm.model_id))
    bar = tqdm(total=len(contexts) * trials * len(schemes), desc="passkey", unit="prompt", disable=not progress)
    for c in contexts:
        for name, scheme in schemes.items():
            ts = time.time()
            hits, depth_hits = [], {}
            for p in prompts[c]:
                tokens = pk.generate_greedy(lm.model, p.ids, pk.IncrementalSchemeAttention(scheme, softcap))
                ok = pk.answer_of(lm.tokenizer, tokens) == p.key
                hits.append(ok)
                depth_hits.setdefault(p.depth, []).append(ok)
                bar.update(1)
            n, k = len(hits), sum(hits)
            acc = k / n
            report.results.append(PasskeyResult(
                method=name, bits_per_element=16.0 if scheme is None else scheme.bits_per_element(), context=c,
                trials=n, correct=k, accuracy=acc, accuracy_se=math.sqrt(acc * (1 - acc) / n),
                by_depth={d: sum(v) / len(v) for d, v in sorted(depth_hits.items())}, seconds=time.time() - ts))
    bar.close()
    report.seconds = time.time() - t0
    return report


def format_passkey_table(report: PasskeyReport) -> str:
    head = (f"{report.model_id}: passkey retrieval, {report.trials} trials per context, filler from {report.text}"
            f"{', chat template' if report.chat_template else ''}")
    cols = f"{'method':<42} {'bits/el':>7} " + " ".join(f"{f'ctx {c}':>15}" for c in report.contexts)
    lines = [head, cols, "-" * len(cols)]
    by = {}
    for r in report.results:
        by.setdefault((r.method, r.bits_per_element), {})[r.context] = r
    for (m, bits), rs in by.items():
        cells = " ".join(f"{100 * rs[c].accuracy:>6.1f} ± {100 * rs[c].accuracy_se:>5.1f}" for c in report.contexts)
        lines.append(f"{m:<42} {bits:>7.3f} {cells}")
    lines.append(f"(accuracy %, ± = binomial standard error; depths {report.depths} cycled; mean prompt tokens "
                 + ", ".join(f"{c}: {t:.0f}" for c, t in report.mean_prompt_tokens.items()) + ")")
    return "\n".join(lines)


def format_eval_table(report: EvalReport) -> str:
    head = f"{report.model_id} on {report.text}: {report.num_windows} windows x {report.seq_len} tokens"
    cols = f"{'method':<42} {'bits/el':>7} {'compr':>6} {'ppl':>8} {'Δppl %':>15} {'KL(fp16‖m)':>17} {'top-1 %':>13}"
    lines = [head, cols, "-" * len(cols)]
    def se(x, width: int, digits: int, scale: float = 1.0) -> str:  # "—" where one window gives no error bar
        return f"{scale * x:>{width}.{digits}f}" if x is not None and math.isfinite(x) else f"{'—':>{width}}"

    for r in report.results:
        lines.append(
            f"{r.method:<42} {r.bits_per_element:>7.3f} {r.compression:>5.2f}x {r.ppl:>8.3f} "
            f"{r.delta_ppl_pct:>+7.2f} ± {se(r.delta_ppl_pct_se, 5, 2)} {r.kl:>8.4f} ± {se(r.kl_se, 6, 4)} "
            f"{100 * r.top1:>6.2f} ± {se(r.top1_se, 4, 2, 100)}"
        )
    fp16_toks = {r.fp16_tokens_per_seq for r in report.results if r.fp16_tokens_per_seq}
    lines.append(f"(± = standard error over windows; bits/el counts quantized tiles with scales; "
                 f"fp16 tokens kept per sequence: {', '.join(str(t) for t in sorted(fp16_toks)) or 'none'})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
def inspect(recipe: str | os.PathLike, plot: str | os.PathLike | None = None, overwrite: bool = False) -> dict:
    """Summarise a recipe; with ``plot``, write a PNG heatmap of bits per layer and head."""
    if plot is not None:
        plot = check_output(plot, flag="--plot", what="PNG", is_ours=is_png, overwrite=overwrite)
    header = read_header(recipe, flag=None)
    r = Recipe.load(recipe, flag=None)
    per_layer = r.bytes_per_token()
    summary = {
        **header,
        "bits_per_element": r.bits_per_element(), "compression": r.compression(),
        "bytes_per_token_per_layer": per_layer, "bytes_per_token": sum(per_layer),
        "fp16_bytes_per_token": 2 * r.num_layers * r.fingerprint.num_kv_heads * r.fingerprint.head_dim * 2,
        "k_bits": r.k_bits.tolist(), "v_bits": r.v_bits.tolist(),
        **_rank_bytes(r),
        "k_bits_histogram": {int(b): int((r.k_bits == b).sum()) for b in r.k_bits.unique()},
        "v_bits_histogram": {int(b): int((r.v_bits == b).sum()) for b in r.v_bits.unique()},
        "provenance": provenance(r.seed),
    }
    if plot is not None:
        from .plot import plot_bits_heatmap

        summary["plot"] = str(plot_bits_heatmap(r, plot))
    return summary


def _rank_bytes(r: Recipe) -> dict:
    """Bytes per token on each tensor-parallel rank, and what every rank's pages are padded to
    (vLLM needs one page size per layer on all ranks), for the sizes the recipe is balanced for and
    the small sizes that split its KV heads."""
    from .runtime.paged import CacheSource, rank_bytes_per_token, tp_page_bytes

    h = r.fingerprint.num_kv_heads
    sizes = sorted(set(r.budget.get("tp_sizes", [])) | {t for t in (2, 4, 8) if t <= h and h % t == 0})
    src = CacheSource("recipe", tuple(r.layer_formats()), r.keep_first_tile)
    ranks, padded = {}, {}
    for t in sizes:
        try:
            ranks[str(t)] = [round(b, 2) for b in rank_bytes_per_token(src, t)]
            padded[str(t)] = round(sum(tp_page_bytes(src, t)) / r.tile, 2)
        except ValueError:  # a recorded size that does not split this model's heads (a damaged file)
            continue
    return {"bytes_per_token_per_rank": ranks, "tp_padded_bytes_per_token": padded}


def format_inspect(s: dict) -> str:
    """The text report of ``inspect``; every value read from the file goes through ``printable``
    (a recipe's metadata is untrusted: no control characters reach the terminal, lengths capped)."""
    fp, P = s["fingerprint"], printable
    lines = [
        f"recipe {P(s['path'], 300)} (format {P(s['format_version'])}, kvarn {P(s['kvarn_version'], 64)}, "
        f"created {P(s['created'], 64)}, seed {s['seed']})",
        f"model: {P(s['model_id'], 200)} — {fp['num_layers']} layers, {fp['num_kv_heads']} KV heads, head_dim {fp['head_dim']} "
        f"(fingerprint {P(s['fingerprint_digest'], 64)})",
        f"calibration: {P(s['calibration'], 400)}",
        f"budget: {P(s['budget'])}; tile {s['tile']}, first tile fp16: {s['keep_first_tile']}",
        f"formats: K {P(s['k_format'])}  V {P(s['v_format'])}",
        f"achieved: {s['bits_per_element']:.3f} bits/element (scales included), {s['compression']:.2f}x smaller than fp16; "
        f"{s['bytes_per_token']:.1f} of {s['fp16_bytes_per_token']} fp16 bytes per token",
        f"K bits histogram (layer×head): {s['k_bits_histogram']}   V: {s['v_bits_histogram']}",
        *(f"tensor-parallel {t}: bytes per token per rank {b}, pages padded to {s['tp_padded_bytes_per_token'][t]} "
          f"on every rank ({100 * (1 - sum(b) / (int(t) * s['tp_padded_bytes_per_token'][t])):.1f}% padding"
          f"{', balanced by calibration' if int(t) in s['budget'].get('tp_sizes', []) else ''})"
          for t, b in s["bytes_per_token_per_rank"].items()),
        "layer  K bits per head          V bits per head",
    ]
    for l, (kb, vb) in enumerate(zip(s["k_bits"], s["v_bits"])):
        lines.append(f"{l:>5}  {' '.join(f'{b:>2}' for b in kb):<24} {' '.join(f'{b:>2}' for b in vb)}")
    if "plot" in s:
        lines.append(f"heatmap written to {s['plot']}")
    return "\n".join(lines)
