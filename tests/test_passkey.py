"""kvarn.passkey: the incremental reader against the whole-sequence reader, prompts, and flag errors.

The reference for a decoding step is ``SchemeAttention`` over the whole sequence so far (no cache):
the last position's logits of a full forward. The incremental reader (a transformers cache of exact
K/V, quantized completed tiles kept between steps) must give the same logits at every step, also
across a tile that completes during decoding. A 2-layer random Llama keeps it fast.
"""

from __future__ import annotations

import random

import pytest
import torch

from kvarn import passkey as pk
from kvarn.errors import KvarnError
from kvarn.model_hook import attached
from kvarn.quant.scheme import SchemeAttention, preset_scheme


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("name", ["kvarn-k2v2-g128", "kivi-2", "turboquant-3bit-nc"])
def test_incremental_reader_matches_whole_sequence(tiny, name):
    from transformers import DynamicCache

    scheme = None if name is None else preset_scheme(name, 2, 1, 64)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (1, 388), generator=gen)
    prompt = 381  # decoding crosses the tile boundary at 384
    handler = pk.IncrementalSchemeAttention(scheme)
    cache = DynamicCache()
    with torch.no_grad():
        with attached(tiny, handler):
            steps = [tiny(input_ids=ids[:, :prompt], past_key_values=cache, use_cache=True).logits[0, -1]]
            for p in range(prompt, ids.shape[1]):
                steps.append(tiny(input_ids=ids[:, p:p + 1], past_key_values=cache, use_cache=True,
                                  cache_position=torch.tensor([p])).logits[0, -1])
        for i, got in enumerate(steps):
            n = prompt + i
            with attached(tiny, SchemeAttention(scheme)):
                ref = tiny(input_ids=ids[:, :n], use_cache=False).logits[0, -1]
            err = (got - ref).abs().max().item()
            assert err <= 1e-4 * ref.abs().max().item(), f"{name}: step at {n} tokens, max |logit diff| {err:.2e}"


def test_reader_refuses_a_cache_that_does_not_extend(tiny):
    handler = pk.IncrementalSchemeAttention(preset_scheme("kvarn-k2v2-g128", 2, 1, 64))
    with torch.no_grad(), attached(tiny, handler):
        tiny(input_ids=torch.zeros(1, 300, dtype=torch.long))
        with pytest.raises(ValueError, match="one per generation"):
            tiny(input_ids=torch.zeros(1, 200, dtype=torch.long))


def test_prompts(smollm):
    text = " ".join(f"Sentence number {i} says that the river runs past the old mill today." for i in range(3000))
    builder = pk.PromptBuilder(smollm.tokenizer, pk.filler_sentences(text))
    rng = random.Random(0)
    for ctx in (300, 1000):
        places = []
        for depth in pk.DEPTHS:
            p = builder.build(ctx, depth, rng)
            decoded = smollm.tokenizer.decode(p.ids)
            assert ctx - 40 <= len(p.ids) <= ctx, f"context {ctx}: prompt has {len(p.ids)} tokens"
            assert decoded.count(p.key) == 2 and len(p.key) == 5, "the key is stated twice"
            body = decoded[decoded.index(pk._INTRO) + len(pk._INTRO):decoded.index(pk._QUESTION)]
            places.append(body.index(p.key) / len(body))
            assert abs(places[-1] - depth) < 0.1, f"context {ctx}, depth {depth}: needle at {places[-1]:.2f} of the filler"
            assert decoded.endswith(pk._ANSWER_PREFIX)
    assert pk.answer_of(smollm.tokenizer, smollm.tokenizer(" 41529.")["input_ids"]) == "41529"
    assert pk.answer_of(smollm.tokenizer, smollm.tokenizer(" forty")["input_ids"]) is None


@pytest.mark.parametrize("kwargs,flag", [
    ({"contexts": [100]}, "--contexts"), ({"contexts": []}, "--contexts"), ({"trials": 0}, "--trials"),
    ({"methods": ["turboquant-k2"]}, "--methods"),
])
def test_bad_flags_are_one_line(kwargs, flag):
    from kvarn import api

    with pytest.raises(KvarnError) as ei:
        api.evaluate_passkey(**kwargs, progress=False)
    msg = str(ei.value)
    assert msg.startswith(flag) and "\n" not in msg, msg
