"""``kvarn`` command line: thin click wrappers over ``kvarn.api`` (torch is imported lazily)."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import sys

import click

from .errors import KvarnError, printable

_ARGV: list[str] = []  # the arguments of this invocation, for the reports' provenance


def _run(fn):
    """Every failure is one line on stderr: a ``KvarnError`` (the input is wrong) exits 2; anything
    else is a kvarn bug and exits 1 with its first line (``KVARN_DEBUG=1`` shows the traceback)."""
    try:
        return fn()
    except KvarnError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the last line of defence against a traceback
        if os.environ.get("KVARN_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        click.echo(f"error: internal error in kvarn ({type(e).__name__}: {printable(first, 300)}); this is a bug — "
                   "rerun with KVARN_DEBUG=1 for the traceback and report it", err=True)
        sys.exit(1)


def _emit(obj, as_json: bool, text: str) -> None:
    """The report: strict JSON (no NaN; ``null`` instead) with the kvarn command line in its
    provenance, or the text."""
    from .report import dumps

    if isinstance(obj, dict) and isinstance(obj.get("provenance"), dict):
        obj["provenance"]["command"] = shlex.join(["kvarn", *_ARGV])
    click.echo(dumps(obj) if as_json else text)


@contextlib.contextmanager
def _verbosity(verbose: int, quiet: bool):
    """Route kvarn's log to stderr for one command: warnings by default, ``-v`` info, ``-vv``
    debug, ``-q`` errors only (and no progress bars, transformers' warnings silenced). Yields
    whether progress bars may be shown; the logger is left as it was found afterwards."""
    if verbose and quiet:
        raise KvarnError("-v and -q both given; pass one of them (-v: more detail, -q: errors only)")
    level = logging.ERROR if quiet else logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING
    log = logging.getLogger("kvarn")
    before = (log.level, log.propagate)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    tf = None
    if quiet:
        import transformers

        tf = transformers.logging
        tf_before = (tf.get_verbosity(), tf.is_progress_bar_enabled())
        tf.set_verbosity_error()
        tf.disable_progress_bar()
    try:
        yield not quiet
    finally:
        log.removeHandler(handler)
        log.setLevel(before[0])
        log.propagate = before[1]
        if tf is not None:
            tf.set_verbosity(tf_before[0])
            if tf_before[1]:
                tf.enable_progress_bar()


class _Group(click.Group):
    def main(self, args=None, *a, **kw):
        global _ARGV
        _ARGV = list(sys.argv[1:] if args is None else args)
        return super().main(args, *a, **kw)


def _clip(no_clip: bool, clip_what: str | None, default):
    """``api.calibrate``'s ``clip`` from ``--no-clip`` and ``--clip`` (None: not given, ``default``)."""
    if no_clip and clip_what not in (None, "none"):
        raise KvarnError(f"--no-clip with --clip {clip_what}: they disagree; use --clip {clip_what} alone")
    if no_clip:
        return False
    return default if clip_what is None else {"both": True, "keys": "keys", "values": "values", "none": False}[clip_what]


def _model_options(f):
    """How the model is loaded and how much is said: the same on every command that loads one."""
    for opt in reversed([
        click.option("--device", default="auto", metavar="DEVICE",
                     help="Where the model runs: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda, cuda:N."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                     help="Weights' dtype: auto = the model config's own (float32 for .gguf files)."),
        click.option("--revision", default=None, metavar="REV",
                     help="Branch, tag or commit of a Hugging Face model id. [default: the hub's default branch]"),
        click.option("--trust-remote-code", is_flag=True, help="Allow a hub model's own Python code to run (only for models you trust)."),
        click.option("-v", "--verbose", count=True, show_default=False, help="Say more on stderr (-vv: debug). [default: warnings only]"),
        click.option("-q", "--quiet", is_flag=True, help="Errors only: no progress bars or warnings."),
    ]):
        f = opt(f)
    return f


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="kvarn")
def main():
    """kvarn: calibrated KVarN KV-cache quantization (4-6x smaller caches)."""


@main.command(epilog="""\b
Examples:
  kvarn calibrate                              # embedded SmolLM2-135M, wiki-first-half, 3.0 bits
  kvarn calibrate ./my-model --avg-bits 2.6    # recipe lands in ./my-model/kvarn/recipe.safetensors
  kvarn calibrate model.gguf --calib notes.txt --compression 5 -o r.safetensors
""")
@click.argument("model", required=False)
@click.option("--calib", default=None, metavar="SPEC", help="Calibration set: a name in calibrate/, a .yaml spec, a .txt/.jsonl file, a save_to_disk folder, wiki:first or hf:NAME[:CONFIG[:SPLIT]]. [default: wiki-first-half]")
@click.option("--num-samples", type=int, default=None, help="Override the spec's number of windows. [default: the spec's, 6 for wiki-first-half]")
@click.option("--seq-len", type=int, default=None, help="Override the spec's window length (tokens). [default: the spec's, 1024 for wiki-first-half]")
@click.option("--text-column", default=None, metavar="NAME", help="Field of a .jsonl file or dataset: text, or chat messages (rendered with the model's chat template). [default: the spec's, text; rows with only \"messages\" are chats]")
@click.option("--avg-bits", type=float, default=None, help="Memory target: average stored bits per K/V element, scales included. [default: 3.0]")
@click.option("--compression", type=float, default=None, help="Memory target as times fewer bytes than fp16 (alternative to --avg-bits). [default: none, --avg-bits is used]")
@click.option("-o", "--output", default=None, metavar="PATH", help="Recipe path. [default: MODEL/kvarn/recipe.safetensors for a model directory (weight loaders do not look there), else ./kvarn_recipe.safetensors]")
@click.option("--tile", type=click.Choice(["64", "128"]), default="128", help="Tokens per quantized tile.")
@click.option("--objective", type=click.Choice(["fisher", "mse"]), default="fisher", help="Allocation objective: loss-gradient-weighted or plain attention-output error.")
@click.option("--k-normalize", type=click.Choice(["none", "tile"]), default="none", help="Keys: KVarN per-tile normalization (stores a per-token scale) or none.")
@click.option("--v-normalize", type=click.Choice(["static", "tile", "none"]), default="static", help="Values: calibrated per-channel scale (free), KVarN per-tile normalization, or none.")
@click.option("--no-clip", is_flag=True, help="Plain min/max ranges instead of the MSE-optimal clipping search (same as --clip none).")
@click.option("--clip", "clip_what", type=click.Choice(["both", "keys", "values", "none"]), default=None,
              help="Which tensors get the MSE-optimal clipping search; the others keep min/max ranges (clipped keys "
                   "lose retrieval at long context). [default: values]")
@click.option("--seed", type=int, default=0, help="Which windows of the text calibrate: drawn at random under this seed (recorded in the recipe).")
@click.option("--device-map", default=None, type=click.Choice(["auto", "balanced", "balanced_low_0", "sequential"]),
              help="Spread the model over the GPUs (and the CPU) with accelerate, for a model larger than one device; leaves --device at auto. [default: the whole model on --device]")
@click.option("--tp-size", type=int, default=1, help="Balance the bits so each of this many tensor-parallel ranks holds equal bytes per token in every layer.")
@click.option("--min-k-bits", type=int, default=None, help="Key-width floor: no key head is stored narrower than this (2, 3, 4 or 8); the values take the rest of the budget (recorded in the recipe). [default: no floor]")
@click.option("--overwrite", is_flag=True, help="Replace an existing file at -o that kvarn did not write (never a device or model weights).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (strict: null for a number that is not finite).")
@_model_options
def calibrate(model, calib, num_samples, seq_len, text_column, avg_bits, compression, output, tile, objective, k_normalize,
              v_normalize, no_clip, clip_what, seed, device_map, tp_size, min_k_bits, overwrite, as_json, device, dtype, revision, trust_remote_code, verbose, quiet):
    """Calibrate MODEL (HF directory or id, .gguf file; default: embedded SmolLM2-135M) and write a recipe."""

    def go():
        with _verbosity(verbose, quiet) as show:
            _calibrate(show)

    def _calibrate(show):
        from . import api

        _, rep = api.calibrate(model, calib=calib, num_samples=num_samples, seq_len=seq_len, avg_bits=avg_bits,
                               compression=compression, output=output, tile=int(tile), objective=objective,
                               k_normalize=k_normalize, v_normalize=v_normalize, clip=_clip(no_clip, clip_what, api.DEFAULT_CLIP),
                               seed=seed, progress=show and not as_json, overwrite=overwrite, device=device,
                               dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                               text_column=text_column, tp_size=tp_size, min_k_bits=min_k_bits,
                               device_map=device_map)
        text = (f"wrote {rep.recipe_path}: {rep.bits_per_element:.3f} bits/element (scales included), "
                f"{rep.compression:.2f}x smaller than fp16; mean K bits {rep.k_bits_mean:.2f}, V bits {rep.v_bits_mean:.2f}; "
                f"calibrated on {rep.calibration['set']} ({rep.calibration['tokens']} tokens) in {rep.seconds:.1f} s")
        _emit(rep.__dict__, as_json, text)

    _run(go)


@main.command("eval", epilog="""\b
Examples:
  kvarn eval --recipe kvarn_recipe.safetensors
  kvarn eval ./my-model --recipe ./my-model/kvarn/recipe.safetensors --text heldout.txt --json
  kvarn eval --seq-len 4096 --methods kvarn-k4v2-g128,turboquant-k3v4-nc
  kvarn eval --task passkey --contexts 2048,4096,8192 --trials 20
""")
@click.argument("model", required=False)
@click.option("--recipe", multiple=True, metavar="PATH", help="Recipe to evaluate; repeat to compare several. [default: the model's own recipe — MODEL/kvarn/recipe.safetensors, or recipes/ for the embedded model]")
@click.option("--no-recipe", is_flag=True, help="Compare the baselines only.")
@click.option("--text", default="wiki:second", help="Held-out text: wiki:second, a .txt/.jsonl file, a save_to_disk folder or hf:NAME.")
@click.option("--text-column", default="text", metavar="NAME", help="Field of a .jsonl file or dataset: text, or chat messages (rendered with the model's chat template); rows with only \"messages\" are chats.")
@click.option("--num-windows", type=int, default=8, help="Windows of held-out text.")
@click.option("--seq-len", type=int, default=1024, help="Tokens per window; more than 2 tiles, so that a quantized tile is read.")
@click.option("--seed", type=int, default=0, help="Which windows of the text (passkey: which keys, filler and depths): drawn at random under this seed.")
@click.option("--methods", default=None, help="Comma-separated baselines. [default: kvarn-k4v2-g128,int4-per-token-head,kivi-2,fp8-e4m3; for passkey kvarn-k4v2-g128,turboquant-k3v4-nc,fp8-e4m3]")
@click.option("--task", type=click.Choice(["ppl", "passkey"]), default="ppl",
              help="ppl: perplexity, KL and top-1 on --text windows; passkey: retrieval of a 5-digit key hidden in filler from --text.")
@click.option("--contexts", default="2048,4096,8192", metavar="N,N,...", help="passkey: prompt lengths in tokens.")
@click.option("--trials", type=int, default=10, help="passkey: prompts per context (the key's depth cycles 10-90%).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON (strict: null for a number that is not finite).")
@_model_options
def eval_cmd(model, recipe, no_recipe, text, text_column, num_windows, seq_len, seed, methods, task, contexts, trials,
             as_json, device, dtype, revision, trust_remote_code, verbose, quiet):
    """Perplexity, KL to fp16 and top-1 agreement per cache method on held-out text."""

    def go():
        with _verbosity(verbose, quiet) as show:
            _eval(show)

    def _eval(show):
        from . import api

        recipes = list(recipe)
        if not recipes and not no_recipe:
            found = api.find_recipe(model)
            if found is None:
                raise KvarnError(f"no recipe for {model or 'the embedded model'}: pass --recipe PATH, make one with "
                                 f"`kvarn calibrate {model or ''}`".rstrip() + ", or use --no-recipe for baselines only")
            recipes = [found]
        names = None if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
        if task == "passkey":
            try:
                ctx = [int(c) for c in contexts.split(",") if c.strip()]
            except ValueError:
                raise KvarnError(f"--contexts {printable(contexts, 60)}: must be comma-separated integers, e.g. --contexts 2048,4096") from None
            rep = api.evaluate_passkey(model, recipe=recipes or None, text=text, contexts=ctx, trials=trials,
                                       methods=names, seed=seed, progress=show and not as_json)
            _emit(rep.to_dict(), as_json, api.format_passkey_table(rep))
            return
        rep = api.evaluate(model, recipe=recipes or None, text=text, num_windows=num_windows, seq_len=seq_len,
                           methods=names, progress=show and not as_json, device=device, dtype=dtype, revision=revision,
                           trust_remote_code=trust_remote_code, text_column=text_column, seed=seed)
        _emit(rep.to_dict(), as_json, api.format_eval_table(rep))

    _run(go)


@main.command(epilog="""\b
Examples:
  kvarn inspect recipes/smollm2-135m-instruct.safetensors --plot bits.png
""")
@click.argument("recipe")
@click.option("--plot", default=None, metavar="PNG", help="Write a heatmap of bits per layer and head. [default: no plot]")
@click.option("--overwrite", is_flag=True, help="Replace an existing file at --plot that is not a PNG (never a device).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (strict).")
@click.option("-v", "--verbose", count=True, show_default=False, help="Say more on stderr (-vv: debug). [default: warnings only]")
@click.option("-q", "--quiet", is_flag=True, help="Errors only.")
def inspect(recipe, plot, overwrite, as_json, verbose, quiet):
    """Summarise a recipe (reads its header and bit tables)."""

    def go():
        with _verbosity(verbose, quiet):
            from . import api

            s = api.inspect(recipe, plot=plot, overwrite=overwrite)
            _emit(s, as_json, api.format_inspect(s))

    _run(go)


if __name__ == "__main__":
    main()
