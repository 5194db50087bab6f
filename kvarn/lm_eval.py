"""lm-evaluation-harness with kvarn's quantized KV cache: the model type ``kvarn``.

Command line (lm-eval's own, with ``kvarn`` registered; every ``lm_eval`` flag works)::

    python -m kvarn.lm_eval --model kvarn --model_args pretrained=./my-model,batch_size=8 --tasks hellaswag
    python -m kvarn.lm_eval --model kvarn --model_args pretrained=smollm2,recipe=r.safetensors \\
        --include_path my_tasks/ --tasks my_task --device cpu

From Python, ``import kvarn.lm_eval`` registers the model type for ``lm_eval.simple_evaluate(model="kvarn",
model_args=...)``; ``KVarNLM(pretrained=..., recipe=...)`` is an ``lm_eval`` ``LM`` object.

``KVarNLM`` is lm-eval's ``HFLM`` (every ``--model hf`` argument works) whose model reads its K/V as
the recipe stores them:

* ``loglikelihood`` and ``loglikelihood_rolling`` (multiple choice, perplexity tasks): teacher-forced,
  one forward pass per batch, every query reading the completed tiles before it quantized and the
  first tile and its own tile in fp16: the runtime's rule, through the reader ``kvarn eval`` uses
  (``SchemeAttention``), so a task score and the ``kvarn eval`` table measure the same cache. HFLM
  pads these batches on the right, after every real token, so padding never enters a tile a real
  token reads.
* ``generate_until``: ``model.generate`` with a ``KVarNCache`` (completed tiles packed, as served).
  The cache takes rows of one length and lm-eval left-pads a batch, so each row is generated alone
  without its padding and padded back on the right; beam search is refused (the cache cannot
  reorder).

``pretrained``: what ``--model hf`` takes (a model folder or hub id, loaded by HFLM), or what kvarn's
commands take besides: ``smollm2`` (the embedded model) or a ``.gguf`` file (converted once and
cached by ``kvarn.models``). ``recipe``: a recipe file (or, from Python, a ``Recipe``); default the model's own
(``MODEL/kvarn/recipe.safetensors``, the shipped one for ``smollm2``). Presets are not recipes: use
``kvarn calibrate`` for a model without one.
"""

from __future__ import annotations

import sys

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own model names first: it fills an empty registry lazily)
    from lm_eval.api.registry import model_registry
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError(f"kvarn.lm_eval needs lm-evaluation-harness ({e}); install it with "
                      "`pip install 'kvarn[lm-eval]'`") from e

import torch

from .errors import KvarnError

MODEL_TYPE = "kvarn"


def _kvarn_only(spec: str) -> bool:
    """Model specs HFLM cannot load but kvarn can: the embedded alias and GGUF files."""
    from .models import EMBEDDED_MODEL

    return spec == EMBEDDED_MODEL or spec.lower().endswith(".gguf")


class KVarNLM(HFLM):
    """lm-eval's ``HFLM`` with the KV cache stored and read as ``recipe`` says (module docstring)."""

    def __init__(self, pretrained="smollm2", recipe=None, **kwargs) -> None:
        from .api import find_recipe
        from .recipe import Recipe

        spec = pretrained if isinstance(pretrained, str) else None
        if spec is not None and _kvarn_only(spec):
            from .models import load_model

            device = kwargs.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = kwargs.pop("dtype", None)
            lm = load_model(spec, dtype=torch.float32 if dtype in (None, "auto") else dtype, device=device)
            kwargs.setdefault("tokenizer", lm.tokenizer)
            pretrained = lm.model
        super().__init__(pretrained=pretrained, **kwargs)
        path = recipe if recipe is not None else find_recipe(spec) if spec is not None else None
        if path is None:
            raise KvarnError(f"--model_args: {spec or 'this model'} has no kvarn recipe (MODEL/kvarn/recipe.safetensors); "
                             "pass recipe=PATH or make one with `kvarn calibrate MODEL`")
        self.recipe = path if isinstance(path, Recipe) else Recipe.load(path, flag=None)
        self.recipe_path = "recipe" if isinstance(path, Recipe) else str(path)
        self.recipe.check_model(self.model.config, self.recipe_path)
        self._scheme = self.recipe.to_scheme("recipe")

    # -- loglikelihood: teacher-forced, the runtime's read rule ------------------------------------
    def _model_call(self, inps, attn_mask=None, labels=None):
        from .model_hook import attached
        from .quant.scheme import SchemeAttention

        with attached(self.model, SchemeAttention(self._scheme)):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    # -- generation: KVarNCache, one unpadded row at a time -----------------------------------------
    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        """``context [B, T]`` left-padded (``attention_mask`` marks the real tokens); returns
        ``[B, T + n]``: each row's context as given, then its new tokens, right-padded."""
        from .model_hook import uninstall
        from .runtime.hf_cache import KVarNCache

        if int(generation_kwargs.get("num_beams", 1) or 1) > 1:
            raise KvarnError(f"gen_kwargs num_beams={generation_kwargs['num_beams']}: beam search is not supported "
                             "with the kvarn cache (it cannot reorder tiles); use greedy or sampling")
        mask = generation_kwargs.pop("attention_mask", None)
        width = context.shape[1]
        new_tokens = []
        for i in range(context.shape[0]):
            ids = context[i:i + 1] if mask is None else context[i:i + 1, mask[i].bool()]
            cache = KVarNCache(self.recipe, self.model)
            try:
                out = super()._model_generate(ids, max_length=ids.shape[1] + max_length - width, stop=stop,
                                              attention_mask=torch.ones_like(ids), past_key_values=cache,
                                              **dict(generation_kwargs))
            finally:
                uninstall(self.model)
            new_tokens.append(out[0, ids.shape[1]:])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        res = context.new_full((context.shape[0], width + max(len(t) for t in new_tokens)), pad)
        res[:, :width] = context
        for i, t in enumerate(new_tokens):
            res[i, width:width + len(t)] = t
        return res

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info.update(kvarn_recipe=self.recipe_path, kvarn_bits_per_element=round(self.recipe.bits_per_element(), 4),
                    kvarn_compression=round(self.recipe.compression(), 4), kvarn_version=self.recipe.kvarn_version)
        return info


def register() -> None:
    """Register ``--model kvarn`` with lm-eval; safe to call more than once (and from ``-m``)."""
    if MODEL_TYPE not in model_registry:
        model_registry.register(MODEL_TYPE, target="kvarn.lm_eval:KVarNLM")  # lazy: also when run as __main__


register()


def main() -> None:
    """``python -m kvarn.lm_eval ARGS``: lm-eval's command line with ``--model kvarn`` available; a
    kvarn error is one line (``error: ...``, exit 2), as in kvarn's own commands."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except KvarnError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
