"""Passkey retrieval: a five-digit key hidden at a chosen depth of real filler text, the model asked
to repeat it, generated greedily with each method's cache read the way the runtime reads it.

Prompt (the chat template when the tokenizer has one; the key is stated twice, the filler is short
sentences of the held-out text, the answer is primed as landmark-attention's passkey test does)::

    user:      There is a pass key hidden inside a long text. Read the text, find the pass key
               and remember it.  <filler ...> The pass key is 41529. Remember it. 41529 is the
               pass key. <... filler>  What is the pass key? Answer with the five digits only.
    assistant: The pass key is

A trial is right when the first five-digit number in the first 8 generated tokens is the key.

Reading rule: ``IncrementalSchemeAttention`` is ``SchemeAttention`` over a transformers cache of
exact K/V: the prompt's queries read completed tiles quantized and their own tile exact (as a
``KVarNCache`` prefill routed through kvarn does), and each decoding step reads every completed
tile quantized — including tiles completed during decoding — and the open tile exact. The
quantized form of completed tiles is kept between steps, so a step quantizes only what completed
since the last one (the result is the same as quantizing the whole sequence each step).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from .quant.codec import fake_quantize_sequence, quantized_span
from .quant.scheme import SchemeAttention

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
MAX_NEW_TOKENS = 8
_INTRO = "There is a pass key hidden inside a long text. Read the text, find the pass key and remember it."
_QUESTION = "What is the five-digit pass key? Answer with the five digits only."
_ANSWER_PREFIX = "The five-digit pass key is"


def needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def filler_sentences(text: str, min_words: int = 4, max_words: int = 22) -> list[str]:
    """The text's short sentences, in order (headings, lists and long sentences dropped)."""
    out = []
    for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        n = len(s.split())
        if min_words <= n <= max_words and s[0].isupper() and s[-1] in ".!?" and not re.search(r"\d{5}", s):
            out.append(s)
    return out


@dataclass
class Prompt:
    ids: torch.Tensor  # [T] token ids, ending with the primed answer prefix
    key: str
    depth: float


class PromptBuilder:
    """Prompts of (about) ``context`` tokens from ``sentences``, the needle at a given depth."""

    def __init__(self, tokenizer, sentences: list[str]):
        self.tok = tokenizer
        self.sentences = sentences
        self.lengths = [len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in sentences]
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def _render(self, body: str) -> str:
        user = f"{_INTRO}\n\n{body}\n\n{_QUESTION}"
        if self.chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                add_generation_prompt=True)
            return text + _ANSWER_PREFIX
        return f"{user}\n\n{_ANSWER_PREFIX}"

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=not self.chat)["input_ids"]

    def build(self, context: int, depth: float, rng: random.Random) -> Prompt:
        key = str(rng.randint(10000, 99999))
        overhead = len(self._ids(self._render(needle(key))))
        budget = context - overhead
        n = len(self.sentences)
        start = rng.randrange(n)
        chosen, used, i = [], 0, start
        while used + self.lengths[i % n] <= budget and len(chosen) < n:
            chosen.append(self.sentences[i % n])
            used += self.lengths[i % n]
            i += 1
        at = round(depth * len(chosen))
        body = " ".join(chosen[:at] + [needle(key)] + chosen[at:])
        return Prompt(torch.tensor(self._ids(self._render(body))), key, depth)


class IncrementalSchemeAttention(SchemeAttention):
    """``SchemeAttention`` that keeps each layer's quantized completed tiles between calls (one
    generation: the K/V it is given must extend the previous call's)."""

    def __init__(self, scheme, softcap=None):
        super().__init__(scheme, softcap)
        self._done: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def quantized_kv(self, layer_idx, k16, v16):
        s = self.scheme
        fmt = s.layers[layer_idx]
        t = k16.shape[-2]
        start, end = quantized_span(t, fmt.tile, s.keep_first_tile)
        n0, k_prev, v_prev = self._done.get(layer_idx, (0, k16[:, :, :0], v16[:, :, :0]))
        if n0 > end or k_prev.shape[0] != k16.shape[0]:
            raise ValueError("IncrementalSchemeAttention: K/V do not extend the previous call's; use one per generation")
        lo = max(n0, start)
        if end > lo:
            kp = None if s.k_log_std is None else s.k_log_std[layer_idx]
            vp = None if s.v_log_std is None else s.v_log_std[layer_idx]
            # a tile-aligned run of completed tiles: every one of them is quantized
            k_new = fake_quantize_sequence(k16[:, :, lo:end], fmt.k, fmt.tile, False, kp, s.iters)
            v_new = fake_quantize_sequence(v16[:, :, lo:end], fmt.v, fmt.tile, False, vp, s.iters)
            k_prev = torch.cat([k_prev, k16[:, :, n0:lo], k_new], dim=-2)
            v_prev = torch.cat([v_prev, v16[:, :, n0:lo], v_new], dim=-2)
        elif end > n0:
            k_prev = torch.cat([k_prev, k16[:, :, n0:end]], dim=-2)
            v_prev = torch.cat([v_prev, v16[:, :, n0:end]], dim=-2)
        n = max(n0, end)
        self._done[layer_idx] = (n, k_prev, v_prev)
        return torch.cat([k_prev, k16[:, :, n:]], dim=-2), torch.cat([v_prev, v16[:, :, n:]], dim=-2)


def generate_greedy(model, ids: torch.Tensor, handler, max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    """Greedy tokens after ``ids [T]`` with ``handler`` reading the cache (a fresh cache)."""
    from transformers import DynamicCache

    from .model_hook import attached

    cache = DynamicCache()
    out: list[int] = []
    with torch.no_grad(), attached(model, handler):
        x = ids[None].to(model.device)
        pos = 0
        for _ in range(max_new_tokens):
            n = x.shape[1]
            res = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1,
                        cache_position=torch.arange(pos, pos + n, device=model.device))
            pos += n
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            x = torch.tensor([[nxt]], device=model.device)
    return out


def answer_of(tokenizer, tokens: list[int]) -> str | None:
    m = re.search(r"\d{5}", tokenizer.decode(tokens, skip_special_tokens=True))
    return m.group(0) if m else None
