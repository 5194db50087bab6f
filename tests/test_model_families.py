"""Model families beyond Llama-shaped head_dim 64/128: head_dim 80 (StableLM) and 96 (Phi-3), and
Gemma-2's attention-logit soft-capping (plus its sliding-window layers), on tiny random models
built here from transformers configs (no hub): calibrate (one short window), ``KVarNCache``
prefill + decode + ``generate()``, and logits against a float64 reference reader written here
(the runtime rule: completed tiles read quantized, the first and own tile fp16; the cap applied
to every score before the mask).

Tolerance (the engine tolerance of ``test_runtime_hf``): the cache's logits are closer to the
float64 reference of the same recipe than a tenth of what quantization itself moves them, and the
argmax agrees on at least 97% of positions.
"""

from __future__ import annotations

import pytest
import torch

from kvarn import api
from kvarn.model_hook import attached, install, uninstall
from kvarn.quant.attention import quantized_read_mask
from kvarn.quant.codec import fake_quantize_sequence
from kvarn.runtime.hf_cache import KVarNCache

CAP = 2.0


def _configs(vocab):
    from transformers import Gemma2Config, Phi3Config, StableLmConfig

    common = dict(vocab_size=vocab, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=1024)
    return {
        "stablelm-hd80": (StableLmConfig(hidden_size=160, partial_rotary_factor=0.25, **common), 80),
        "phi3-hd96": (Phi3Config(hidden_size=192, pad_token_id=0, **common), 96),
        # sliding window 96 < the 300-token windows: the sliding layer's mask matters too
        "gemma2-softcap": (Gemma2Config(hidden_size=128, head_dim=64, attn_logit_softcapping=CAP,
                                        query_pre_attn_scalar=64, sliding_window=96, **common), 64),
    }


@pytest.fixture(scope="module")
def families(smollm, tmp_path_factory):
    """name -> (model folder, head_dim); random weights, the SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, (cfg, d) in _configs(len(smollm.tokenizer)).items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        if name.startswith("gemma2"):  # random init gives |scores| << 1: scale q/k so the cap bends them
            for m in model.modules():
                if hasattr(m, "q_proj"):
                    m.q_proj.weight.data *= 8
                    m.k_proj.weight.data *= 8
        model.save_pretrained(root / name)
        smollm.tokenizer.save_pretrained(root / name)
        out[name] = (root / name, d)
    return out


class Float64Reader:
    """The reference reader in float64: K/V as an engine caches them (fp16), completed tiles
    replaced by their stored form (``fake_quantize_sequence``, as ``SchemeAttention``), explicit
    scores, the cap, the mask, softmax. ``scheme`` None: everything exact."""

    def __init__(self, scheme):
        self.scheme = scheme

    def attend(self, layer_idx, q, k, v, bias, scaling, softcap=None):
        s = self.scheme
        k16, v16 = k.float().half().float(), v.float().half().float()
        t = k.shape[-2]
        pos = torch.arange(t)
        if s is None:
            k_hat, v_hat = k16, v16
            mask = torch.zeros(q.shape[-2], t, dtype=torch.bool)
        else:
            f = s.layers[layer_idx]
            k_hat = fake_quantize_sequence(k16, f.k, f.tile, s.keep_first_tile, s.k_log_std[layer_idx])
            v_hat = fake_quantize_sequence(v16, f.v, f.tile, s.keep_first_tile, s.v_log_std[layer_idx])
            mask = quantized_read_mask(pos[t - q.shape[-2]:], pos, f.tile, s.keep_first_tile)
        g = q.shape[1] // k.shape[1]
        rep = lambda x: x.double().repeat_interleave(g, 1)  # noqa: E731
        qd = q.double()
        scores = torch.where(mask, qd @ rep(k_hat).transpose(-1, -2), qd @ rep(k16).transpose(-1, -2)) * scaling
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        if bias is not None:
            scores = scores + bias.double()
        p = torch.softmax(scores, -1)
        m = mask.double()
        return ((p * m) @ rep(v_hat) + (p * (1 - m)) @ rep(v16)).float()


@pytest.mark.parametrize("name", ["stablelm-hd80", "phi3-hd96", "gemma2-softcap"])
def test_calibrate_cache_and_generate(families, name):
    from transformers import AutoModelForCausalLM

    from kvarn.data import load_text, make_windows

    path, d = families[name]
    recipe, report = api.calibrate(str(path), calib="wiki:first", num_samples=1, seq_len=300, avg_bits=3.0,
                                   output=path / "kvarn" / "recipe.safetensors", progress=False)
    assert recipe.fingerprint.head_dim == d
    assert report.bits_per_element <= 3.0 + 1e-6 and torch.isfinite(recipe.k_err).all()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = __import__("transformers").AutoTokenizer.from_pretrained(path)
    text, _ = load_text("wiki:second")
    ids = make_windows(tok, text, 1, 330, "wiki:second")
    with torch.no_grad():
        with attached(model, Float64Reader(recipe.to_scheme())):
            ref = model(ids).logits[0].double()
        with attached(model, Float64Reader(None)):
            exact = model(ids).logits[0].double()
        cache = KVarNCache(recipe, model)
        try:
            outs, p = [], 0
            for n in [150, 110] + [1] * 70:  # prefill chunks across tiles, then decode through a tile edge
                outs.append(model(ids[:, p:p + n], past_key_values=cache, use_cache=True).logits[0].double())
                p += n
        finally:
            uninstall(model)
    got = torch.cat(outs)
    to_ref = (got - ref).abs().mean().item()
    moved = (ref - exact).abs().mean().item()
    assert moved > 0, "test is vacuous: quantization changed nothing"
    assert to_ref < 0.1 * moved, f"{name}: |cache - float64 reference| {to_ref:.2e} vs quantization's own {moved:.2e}"
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.97, f"{name}: argmax agreement {agree:.3f}"
    assert cache.nbytes() == cache.predicted_nbytes(1, 330)
    assert all(len(layer.tiles) == 1 for layer in cache.layers)  # tile 1 completed (tile 0 kept fp16)

    cache = KVarNCache(recipe, model)
    try:
        out = model.generate(ids[:, :280], past_key_values=cache, max_new_tokens=6, do_sample=False)
    finally:
        uninstall(model)
    assert out.shape[1] == 286 and cache.get_seq_length() == 285

    # kvarn eval reads the same recipe (SchemeAttention, with the cap where the model has one)
    report = api.evaluate(str(path), recipe=path / "kvarn" / "recipe.safetensors", num_windows=1, seq_len=300,
                          methods=[], progress=False)
    rows = {r.method.split(" ")[0]: r for r in report.results}
    assert set(rows) == {"fp16", "recipe"}, list(rows)
    assert all(r.ppl == r.ppl and r.ppl < float("inf") for r in rows.values())
    assert rows["recipe"].kl > 0


def test_softcap_is_applied_where_transformers_applies_it(families):
    """kvarn's attention on Gemma-2 (exact reads) equals the model's own eager attention, and the
    cap matters for this model (without it the logits move)."""
    from transformers import AutoModelForCausalLM

    path, _ = families["gemma2-softcap"]
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = torch.randint(5, 1000, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids).logits
        install(model, None)  # kvarn's attention function, no handler: exact mixed_attention
        try:
            hooked = model(ids).logits
        finally:
            uninstall(model)
        for m in model.modules():
            if hasattr(m, "attn_logit_softcapping"):
                m.attn_logit_softcapping = None
        uncapped = model(ids).logits
    torch.testing.assert_close(hooked, eager, rtol=1e-4, atol=1e-4)
    assert (uncapped - eager).abs().max() > 100 * (hooked - eager).abs().max(), "the cap changes nothing here"


def test_handler_without_softcap_is_refused_in_one_line(families):
    from transformers import AutoModelForCausalLM

    from kvarn.errors import KvarnError

    class Old:
        def attend(self, layer_idx, q, k, v, bias, scaling):
            raise AssertionError("must not be called on a capped model")

    path, _ = families["gemma2-softcap"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with pytest.raises(KvarnError) as ei, torch.no_grad(), attached(model, Old()):
        model(torch.tensor([[1, 2, 3]]))
    assert "soft-capping" in str(ei.value) and "\n" not in str(ei.value)


def test_config_only_failures_come_before_any_weights_load(tmp_path, families):
    """A head_dim with no rotation (72) and a nonsensical cap fail from the config alone: the
    folders have no weights at all."""
    import json
    import shutil

    from kvarn.errors import KvarnError

    src, _ = families["gemma2-softcap"]
    for name, change, words in (("hd72", {"head_dim": 72}, ("head_dim=72", "80, 96")),
                                ("badcap", {"attn_logit_softcapping": -3}, ("attn_logit_softcapping",))):
        d = tmp_path / name
        d.mkdir()
        for f in src.iterdir():
            if f.suffix != ".safetensors" and f.is_file():
                shutil.copy(f, d / f.name)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(change)
        (d / "config.json").write_text(json.dumps(cfg))
        for fn in (lambda: api.calibrate(str(d), calib="wiki:first", num_samples=1, seq_len=300,
                                         output=tmp_path / f"{name}.safetensors", progress=False),
                   lambda: api.evaluate(str(d), num_windows=1, seq_len=300, progress=False)):
            with pytest.raises(KvarnError) as ei:
                fn()
            msg = str(ei.value)
            assert all(w in msg for w in words) and "\n" not in msg, msg
