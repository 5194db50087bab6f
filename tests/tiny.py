"""Tiny local models and texts for fast end-to-end tests (no hub): a 2-layer Llama with a 500-token
byte-level BPE tokenizer trained on the fly, saved in bfloat16 with a chat template."""

from __future__ import annotations

import random
from pathlib import Path

import torch

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
WORDS = ("the quick brown fox jumps over lazy dog anarchism political philosophy autism disorder albedo measure "
         "reflection river mountain city history science language music energy water light").split()


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    from test_data import _tiny_tokenizer

    tok = _tiny_tokenizer(model_max_length=4096)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def tiny_model_dir(path: Path, dtype=torch.bfloat16, chat_template: str | None = CHAT_TEMPLATE, seed: int = 0) -> Path:
    """A model folder (config, bf16 weights, tokenizer): head_dim 64, 1 KV head, 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(chat_template)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def words_text(n_words: int = 3000, seed: int = 0) -> str:
    """Seeded random sentences (about 3-4 tiny-tokenizer tokens per word), in paragraphs."""
    rng = random.Random(seed)
    paras = []
    while sum(len(p.split()) for p in paras) < n_words:
        paras.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))).capitalize() + ".")
    return "\n".join(paras)
