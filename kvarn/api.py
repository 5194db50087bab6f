"""kvarn's Python API: ``calibrate``, ``evaluate``, ``inspect``. All orchestration lives here.

Data flows one way: model → capture → stats → allocation → recipe; ``evaluate`` reads a recipe back
through the same reference reader the runtime is checked against.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
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

logger = logging.getLogger(__name__)

DEFAULT_TEXT = "wiki:second"
DEFAULT_CALIB = "wiki-first-half"
DEFAULT_AVG_BITS = 3.0
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


def calibrate(
    model: str | None = None, calib: str | None = None, num_samples: int | None = None,
    seq_len: int | None = None, avg_bits: float | None = None, compression: float | None = None,
    output: str | os.PathLike | None = None, tile: int = 128, keep_first_tile: bool = True,
    objective: str = "fisher", k_normalize: str = "none", v_normalize: str = "static",
    clip: bool = True, seed: int = 0, progress: bool = True, loaded=None, overwrite: bool = False,
) -> tuple[Recipe, CalibrationReport]:
    """Calibrate ``model`` on a calibration set and write a recipe.

    Lifecycle: load model → tokenize the calibration set into windows → capture streaming K/V
    statistics and per-candidate attention-output errors → allocate K/V bits per layer and head
    under the budget (``avg_bits`` bits/element including scales, or ``compression`` vs fp16) →
    write the recipe atomically. ``loaded`` (a ``LoadedModel``) skips loading.
    """
    from .allocation import allocate_bits
    from .capture import CANDIDATE_BITS, CaptureConfig, capture_kv
    from .data import resolve_calib, spec_hash, load_text, make_windows
    from .models import load_config, load_model
    from .quant.formats import SUPPORTED_TILES, TensorFormat
    from .quant.hadamard import check_head_dim
    from .stats import compute_stats

    t0 = time.time()
    # Everything checkable is checked before any weights load (issue 10): output path, budget,
    # tile, calibration spec, then from the model's config alone head_dim, context and memory.
    out_path = check_output(output_path(output or default_recipe_path(model)), flag="-o/--output",
                            what="kvarn recipe", is_ours=is_recipe_file, overwrite=overwrite)
    avg_bits, budget_flag = preflight.budget_bits(avg_bits, compression, DEFAULT_AVG_BITS)
    if tile not in SUPPORTED_TILES:
        raise KvarnError(f"--tile {tile} is not supported; use one of {list(SUPPORTED_TILES)}")
    spec = resolve_calib(calib or DEFAULT_CALIB, num_samples=num_samples, seq_len=seq_len)
    where = f"--seq-len {spec.seq_len}" if seq_len is not None else f"calibration set {spec.name} (seq_len {spec.seq_len})"
    if spec.seq_len <= tile * (2 if keep_first_tile else 1):
        raise KvarnError(
            f"{where}: too short to read any quantized tile "
            f"(tile {tile}{', first tile kept fp16' if keep_first_tile else ''}); use --seq-len {tile * 4} or more"
        )
    config = loaded.model.config if loaded is not None else load_config(model)
    name = loaded.model_id if loaded is not None else (model or "the embedded model")
    D = _config_shape(config, name)[2]
    check_head_dim(D, f"{name}: head_dim")
    preflight.check_window(config, spec.seq_len, where, backward=True, weights_loaded=loaded is not None,
                           device=None if loaded is None else loaded.model.device)
    k_fmt = TensorFormat((), "channel", k_normalize, clip=clip)
    v_fmt = TensorFormat((), "token", v_normalize, clip=clip)
    min_bits = preflight.min_bits_per_element(k_fmt, v_fmt, tile, D, CANDIDATE_BITS)
    preflight.check_reachable(avg_bits, budget_flag, min_bits,
                              f"{min(CANDIDATE_BITS)}-bit codes with their fp16 scales, head_dim {D}, tile {tile}")
    text, desc = load_text(spec.source)
    torch.manual_seed(seed)
    lm = loaded or load_model(model)
    L, H, D = _model_shape(lm.model)
    windows = make_windows(lm.tokenizer, text, spec.num_samples, spec.seq_len, f"calibration set {spec.name} ({desc})")
    cfg = CaptureConfig(tile=tile, keep_first_tile=keep_first_tile, k=k_fmt, v=v_fmt)
    cap = capture_kv(lm.model, windows, cfg, progress=progress)
    stats = compute_stats(cap, objective)
    alloc = allocate_bits(stats.k_err, stats.v_err, stats.candidate_bits, k_fmt, v_fmt, tile, D, avg_bits)
    budget = {"avg_bits": avg_bits} if compression is None else {"compression": compression, "avg_bits": avg_bits}
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


@dataclass
class EvalReport:
    model_id: str
    text: str
    num_windows: int
    seq_len: int
    recipe: str | None
    results: list[MethodResult] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _se(x: torch.Tensor) -> float:
    return float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def evaluate(
    model: str | None = None, recipe: str | os.PathLike | list | None = None, text: str = DEFAULT_TEXT,
    num_windows: int = 8, seq_len: int = 1024, methods: list[str] | None = None,
    progress: bool = True, loaded=None,
) -> EvalReport:
    """Perplexity, KL(fp16 ‖ method) and top-1 agreement with fp16 on held-out text, for fp16,
    the recipe(s) (a path or a list of paths) and the baselines, each read the way a runtime reads
    its cache. Windows are evaluated one at a time against their own fp16 pass, so memory stays at
    one window's logits per method."""
    from tqdm.auto import tqdm

    from .data import load_text, make_windows
    from .model_hook import attached
    from .models import load_config, load_model
    from .quant.scheme import PRESETS, SchemeAttention, preset_scheme

    t0 = time.time()
    # before any weights load: the flags, the recipes (and that they fit the model's config), the
    # window against the model's context and this machine's memory, the text
    for flag, value in (("--num-windows", num_windows), ("--seq-len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise KvarnError(f"{flag} {value!r}: must be an integer >= 1; pass a positive integer")
    recipe_paths = [] if recipe is None else [recipe] if isinstance(recipe, (str, os.PathLike)) else list(recipe)
    recipes = [(path, Recipe.load(path)) for path in recipe_paths]
    for path, r in recipes:
        if r.calibration.get("source") == text:
            raise KvarnError(f"--text {text}: this is the calibration text of {path}; evaluate on held-out text (e.g. wiki:second)")
    names = list(methods) if methods is not None else list(BASELINES)
    for name in names:
        if name not in PRESETS:
            raise KvarnError(f"--methods: unknown method {printable(name, 60)}; valid methods are {list(PRESETS)}")
    config = loaded.model.config if loaded is not None else load_config(model)
    L, H, D = _config_shape(config, loaded.model_id if loaded is not None else (model or "the embedded model"))
    for path, r in recipes:
        r.check_model(config, path)
    preflight.check_window(config, seq_len, f"--seq-len {seq_len}", backward=False, weights_loaded=loaded is not None,
                           device=None if loaded is None else loaded.model.device)
    body, desc = load_text(text)
    lm = loaded or load_model(model)
    schemes = {"fp16": None}
    for path, r in recipes:
        schemes[f"recipe ({Path(path).name})"] = r.to_scheme("recipe")
    for name in names:
        schemes[name] = preset_scheme(name, L, H, D)
    windows = make_windows(lm.tokenizer, body, num_windows, seq_len, f"--text {text} ({desc})",
                           flags=("--num-windows", "--seq-len"))
    per = {name: {"nll": [], "kl": [], "top1": [], "sec": 0.0} for name in schemes}
    bar = tqdm(total=len(windows) * len(schemes), desc="evaluating", unit="pass", disable=not progress)
    with torch.no_grad():
        for w in windows:
            w = w.to(lm.model.device)
            ids = w[None]
            targets = w[1:]
            base = None
            for name, scheme in schemes.items():
                ts = time.time()
                with attached(lm.model, SchemeAttention(scheme)):
                    logp = torch.log_softmax(lm.model(ids).logits[0, :-1].float(), dim=-1)
                if base is None:
                    base = logp
                nll = -logp.gather(-1, targets[:, None])[:, 0]
                per[name]["nll"].append(nll.mean())
                per[name]["kl"].append((base.exp() * (base - logp)).sum(-1).mean())
                per[name]["top1"].append((base.argmax(-1) == logp.argmax(-1)).float().mean())
                per[name]["sec"] += time.time() - ts
                bar.update(1)
    bar.close()
    report = EvalReport(lm.model_id, f"{text} ({desc})", num_windows, seq_len, ", ".join(str(p) for p in recipe_paths) or None)
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
            top1=float(top.mean()), top1_se=_se(top), seconds=per[name]["sec"],
        ))
    report.seconds = time.time() - t0
    return report


def format_eval_table(report: EvalReport) -> str:
    head = f"{report.model_id} on {report.text}: {report.num_windows} windows x {report.seq_len} tokens"
    cols = f"{'method':<42} {'bits/el':>7} {'compr':>6} {'ppl':>8} {'Δppl %':>15} {'KL(fp16‖m)':>17} {'top-1 %':>13}"
    lines = [head, cols, "-" * len(cols)]
    for r in report.results:
        lines.append(
            f"{r.method:<42} {r.bits_per_element:>7.3f} {r.compression:>5.2f}x {r.ppl:>8.3f} "
            f"{r.delta_ppl_pct:>+7.2f} ± {r.delta_ppl_pct_se:>5.2f} {r.kl:>8.4f} ± {r.kl_se:>6.4f} "
            f"{100 * r.top1:>6.2f} ± {100 * r.top1_se:>4.2f}"
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
        "k_bits_histogram": {int(b): int((r.k_bits == b).sum()) for b in r.k_bits.unique()},
        "v_bits_histogram": {int(b): int((r.v_bits == b).sum()) for b in r.v_bits.unique()},
    }
    if plot is not None:
        from .plot import plot_bits_heatmap

        summary["plot"] = str(plot_bits_heatmap(r, plot))
    return summary


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
        "layer  K bits per head          V bits per head",
    ]
    for l, (kb, vb) in enumerate(zip(s["k_bits"], s["v_bits"])):
        lines.append(f"{l:>5}  {' '.join(f'{b:>2}' for b in kb):<24} {' '.join(f'{b:>2}' for b in vb)}")
    if "plot" in s:
        lines.append(f"heatmap written to {s['plot']}")
    return "\n".join(lines)
