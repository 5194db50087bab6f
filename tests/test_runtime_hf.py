"""KVarNCache (transformers runtime) against the reference reader used by `kvarn eval`."""

import pytest
import torch

from kvarn.model_hook import attached, uninstall
from kvarn.quant.scheme import SchemeAttention
from kvarn.recipe import Recipe
from kvarn.runtime.hf_cache import KVarNCache, KVarNLayer

from test_recipe import make_recipe, tiny_config


def _causal(t):
    pos = torch.arange(t)
    return torch.zeros(t, t).masked_fill(pos[None, :] > pos[:, None], float("-inf"))[None, None]


@pytest.mark.parametrize("keep_first_tile", [True, False])
@pytest.mark.parametrize("chunks", [[300], [100, 200, 1, 1, 1], [128, 128, 44], [1] * 40 + [260]])
def test_layer_reads_exactly_like_the_reference(chunks, keep_first_tile):
    """Any chunking of prefill/decode reads completed tiles quantized and its own tile fp16."""
    r = make_recipe(seed=5)
    r = Recipe(**{**r.__dict__, "keep_first_tile": keep_first_tile})
    scheme = r.to_scheme()
    g = torch.Generator().manual_seed(sum(chunks))
    t = sum(chunks)
    q = torch.randn(2, 4, t, 64, generator=g)
    k = torch.randn(2, 2, t, 64, generator=g) * 2
    v = torch.randn(2, 2, t, 64, generator=g)
    bias = _causal(t)
    ref = SchemeAttention(scheme).attend(1, q, k, v, bias, 0.125)
    layer = KVarNLayer(scheme.layers[1], keep_first_tile, r.k_log_std[1], r.v_log_std[1])
    outs, p = [], 0
    for n in chunks:
        kk, vv = layer.update(k[:, :, p : p + n], v[:, :, p : p + n])
        outs.append(layer.attend(q[:, :, p : p + n], kk, vv, bias[..., p : p + n, : p + n], 0.125))
        p += n
    got = torch.cat(outs, dim=2)
    err = (got - ref).abs().max().item()
    assert err < 1e-4, f"attention output max abs diff {err}"
    exact = SchemeAttention(None).attend(1, q, k, v, bias, 0.125)
    if t > 2 * 128:
        assert (exact - ref).abs().max() > 100 * max(err, 1e-6), "test is vacuous: quantization changed nothing"


def test_stored_bytes_match_bytes_per_token():
    r = make_recipe(seed=7)
    cache = KVarNCache(r)
    g = torch.Generator().manual_seed(0)
    t = 0
    for n in [200, 150] + [1] * 50:
        for i, layer in enumerate(cache.layers):
            layer.update(torch.randn(1, 2, n, 64, generator=g), torch.randn(1, 2, n, 64, generator=g))
        t += n
    assert cache.nbytes() == cache.predicted_nbytes(1, t)
    assert all(len(l.tiles) == 2 for l in cache.layers)  # tiles 1 and 2 of 400 tokens, first kept fp16


def test_recipe_for_another_model_is_refused(smollm, tmp_path):
    path = make_recipe(tiny_config()).save(tmp_path / "tiny.safetensors")
    with pytest.raises(Exception) as ei:
        KVarNCache(path, smollm.model)
    assert "tiny.safetensors" in str(ei.value) and "kvarn calibrate" in str(ei.value)


def test_model_cache_agrees_with_reference_and_generates(smollm, small_recipe):
    from kvarn.data import load_text, make_windows

    path, recipe, _ = small_recipe
    model = smollm.model
    text, _ = load_text("wiki:second")
    ids = make_windows(smollm.tokenizer, text, 1, 420, "wiki:second")
    with torch.no_grad():
        with attached(model, SchemeAttention(recipe.to_scheme())):
            ref = model(ids).logits[0]
        with attached(model, SchemeAttention(None)):
            fp16 = model(ids).logits[0]
        cache = KVarNCache(path, model)
        try:
            outs, p = [], 0
            for n in [150, 200] + [1] * 70:
                outs.append(model(ids[:, p : p + n], past_key_values=cache, use_cache=True).logits[0])
                p += n
        finally:
            uninstall(model)
    got = torch.cat(outs)
    to_ref = (got - ref).abs().mean().item()
    ref_to_fp16 = (ref - fp16).abs().mean().item()
    # Both read the same quantized cache; they differ only by float noise that can flip a rounding.
    assert to_ref < 0.1 * ref_to_fp16, (to_ref, ref_to_fp16)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.97, agree
    assert cache.nbytes() == cache.predicted_nbytes(1, 420)

    cache = KVarNCache(path, model)
    try:
        out = model.generate(ids[:, :300], past_key_values=cache, max_new_tokens=12, do_sample=False)
    finally:
        uninstall(model)
    new = out[0, 300:]
    assert len(new) == 12 and cache.get_seq_length() == 311
    with torch.no_grad(), attached(model, SchemeAttention(recipe.to_scheme())):
        teacher = model(out[:, :-1]).logits[0, 299:].argmax(-1)
    assert (teacher == new).float().mean() >= 0.9


def test_held_memory_is_packed_and_matches_the_prediction():
    """With the shipped 3-bit SmolLM2 recipe at 4k tokens: the tensors the cache holds are the page
    records plus the fp16 first tile and tail, their bytes are what ``nbytes`` and the prediction
    from ``bytes_per_token`` say, and below 1/4 of an fp16 cache."""
    from pathlib import Path

    from kvarn.quant.formats import fp16_bytes_per_token

    path = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-135m-instruct.safetensors"
    cache = KVarNCache(path)
    g = torch.Generator().manual_seed(3)
    t = 0
    for n in [4000, 1, 1, 94]:  # the 4096th token arrives in a chunk: tiles it completes wait for the next
        for layer in cache.layers:
            h, d = layer.fmt.num_kv_heads, layer.fmt.head_dim
            layer.update(torch.randn(1, h, n, d, generator=g), torch.randn(1, h, n, d, generator=g))
        t += n
    held = sum(x.numel() * x.element_size() for layer in cache.layers for x in layer.held_tensors())
    assert held == cache.nbytes(), (held, cache.nbytes())
    predicted = cache.predicted_nbytes(1, t)
    assert abs(held - predicted) <= 0.05 * predicted, (held, predicted)
    fp16 = t * sum(fp16_bytes_per_token(l.fmt.num_kv_heads, l.fmt.head_dim) for l in cache.layers)
    assert held < fp16 / 4, f"{held / 2**20:.1f} MiB held vs {fp16 / 2**20:.1f} MiB for fp16"
    assert all(x.dtype in (torch.uint8, torch.float16) for layer in cache.layers for x in layer.held_tensors())


def test_padded_batch_is_refused_and_the_hook_goes_when_the_cache_is_done(smollm, small_recipe):
    from kvarn.errors import KvarnError

    path, _, _ = small_recipe
    model = smollm.model
    ids = torch.randint(5, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    cache = KVarNCache(path, model)
    with pytest.raises(KvarnError) as ei:
        model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2, do_sample=False)
    assert "padded" in str(ei.value) and "\n" not in str(ei.value)
    uninstall(model)
    cache = KVarNCache(path, model)  # installs the hook
    model.generate(ids[:1], past_key_values=cache, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        plain = model(ids[:1]).logits  # no cache given: the kvarn cache is done, the model is itself again
    assert model.config._attn_implementation != "kvarn"
    with torch.no_grad():
        want = model(ids[:1]).logits
    torch.testing.assert_close(plain, want)
