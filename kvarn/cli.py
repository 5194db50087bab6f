"""``kvarn`` command line: thin click wrappers over ``kvarn.api`` (torch is imported lazily)."""

from __future__ import annotations

import json
import os
import sys

import click

from .errors import KvarnError, printable


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
    click.echo(json.dumps(obj, indent=2, default=str) if as_json else text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--calib", default=None, metavar="SPEC", help="Calibration set: a name in calibrate/, a .yaml spec, a .txt/.jsonl file, wiki:first or hf:NAME[:CONFIG[:SPLIT]]. [default: wiki-first-half]")
@click.option("--num-samples", type=int, default=None, help="Override the spec's number of windows.")
@click.option("--seq-len", type=int, default=None, help="Override the spec's window length (tokens).")
@click.option("--avg-bits", type=float, default=None, help="Memory target: average stored bits per K/V element, scales included. [default: 3.0]")
@click.option("--compression", type=float, default=None, help="Memory target as times fewer bytes than fp16 (alternative to --avg-bits).")
@click.option("-o", "--output", default=None, metavar="PATH", help="Recipe path. [default: MODEL/kvarn/recipe.safetensors for a model directory (weight loaders do not look there), else ./kvarn_recipe.safetensors]")
@click.option("--tile", type=click.Choice(["64", "128"]), default="128", help="Tokens per quantized tile.")
@click.option("--objective", type=click.Choice(["fisher", "mse"]), default="fisher", help="Allocation objective: loss-gradient-weighted or plain attention-output error.")
@click.option("--k-normalize", type=click.Choice(["none", "tile"]), default="none", help="Keys: KVarN per-tile normalization (stores a per-token scale) or none.")
@click.option("--v-normalize", type=click.Choice(["static", "tile", "none"]), default="static", help="Values: calibrated per-channel scale (free), KVarN per-tile normalization, or none.")
@click.option("--no-clip", is_flag=True, help="Plain min/max ranges instead of the MSE-optimal clipping search.")
@click.option("--seed", type=int, default=0)
@click.option("--tp-size", type=int, default=1, show_default=True, help="Balance the bits so each of this many tensor-parallel ranks holds equal bytes per token.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file at -o that kvarn did not write (never a device or model weights).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def calibrate(model, calib, num_samples, seq_len, avg_bits, compression, output, tile, objective, k_normalize, v_normalize, no_clip, seed, tp_size, overwrite, as_json):
    """Calibrate MODEL (HF directory or id, .gguf file; default: embedded SmolLM2-135M) and write a recipe."""
    from . import api

    def go():
        _, rep = api.calibrate(model, calib=calib, num_samples=num_samples, seq_len=seq_len, avg_bits=avg_bits,
                               compression=compression, output=output, tile=int(tile), objective=objective,
                               k_normalize=k_normalize, v_normalize=v_normalize, clip=not no_clip,
                               seed=seed, progress=not as_json, overwrite=overwrite, tp_size=tp_size)
        text = (f"wrote {rep.recipe_path}: {rep.bits_per_element:.3f} bits/element (scales included), "
                f"{rep.compression:.2f}x smaller than fp16; mean K bits {rep.k_bits_mean:.2f}, V bits {rep.v_bits_mean:.2f}; "
                f"calibrated on {rep.calibration['set']} ({rep.calibration['tokens']} tokens) in {rep.seconds:.1f} s")
        _emit(rep.__dict__, as_json, text)

    _run(go)


@main.command("eval", epilog="""\b
Examples:
  kvarn eval --recipe kvarn_recipe.safetensors
  kvarn eval ./my-model --recipe ./my-model/kvarn/recipe.safetensors --text heldout.txt --json
""")
@click.argument("model", required=False)
@click.option("--recipe", multiple=True, metavar="PATH", help="Recipe to evaluate; repeat to compare several. [default: the model's own recipe — MODEL/kvarn/recipe.safetensors, or recipes/ for the embedded model]")
@click.option("--no-recipe", is_flag=True, help="Compare the baselines only.")
@click.option("--text", default="wiki:second", show_default=True, help="Held-out text: wiki:second, a .txt/.jsonl file or hf:NAME.")
@click.option("--num-windows", type=int, default=8, show_default=True)
@click.option("--seq-len", type=int, default=1024, show_default=True)
@click.option("--methods", default=None, help="Comma-separated baselines. [default: kvarn-k4v2-g128,int4-per-token-head,kivi-2,fp8-e4m3]")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def eval_cmd(model, recipe, no_recipe, text, num_windows, seq_len, methods, as_json):
    """Perplexity, KL to fp16 and top-1 agreement per cache method on held-out text."""
    from . import api

    def go():
        recipes = list(recipe)
        if not recipes and not no_recipe:
            found = api.find_recipe(model)
            if found is None:
                raise KvarnError(f"no recipe for {model or 'the embedded model'}: pass --recipe PATH, make one with "
                                 f"`kvarn calibrate {model or ''}`".rstrip() + ", or use --no-recipe for baselines only")
            recipes = [found]
        rep = api.evaluate(model, recipe=recipes or None, text=text, num_windows=num_windows, seq_len=seq_len,
                           methods=None if methods is None else [m.strip() for m in methods.split(",") if m.strip()],
                           progress=not as_json)
        _emit(rep.to_dict(), as_json, api.format_eval_table(rep))

    _run(go)


@main.command(epilog="""\b
Examples:
  kvarn inspect recipes/smollm2-135m-instruct.safetensors --plot bits.png
""")
@click.argument("recipe")
@click.option("--plot", default=None, metavar="PNG", help="Write a heatmap of bits per layer and head.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file at --plot that is not a PNG (never a device).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(recipe, plot, overwrite, as_json):
    """Summarise a recipe (reads its header and bit tables)."""
    from . import api

    def go():
        s = api.inspect(recipe, plot=plot, overwrite=overwrite)
        _emit(s, as_json, api.format_inspect(s))

    _run(go)


if __name__ == "__main__":
    main()
