"""The same code on a CUDA device (skipped without one): ops agree with CPU, and a tiny random
model calibrates, evaluates and generates with KVarNCache on the GPU. Runs on the project's H200
under torch 2.11 / transformers 5.17 (see bench/NOTES.md)."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from kvarn.quant.codec import decode_tiles, encode_tiles, fake_quantize_sequence
from kvarn.quant.formats import TensorFormat


@pytest.mark.parametrize("fmt", [
    TensorFormat((2, 3, 4), "channel", "none", clip=True),
    TensorFormat((4, 4, 8), "channel", "tile"),
    TensorFormat((2, 2, 3), "token", "static", clip=True),
    TensorFormat((2, 4, 16), "token", "tile"),
])
def test_codec_cuda_matches_cpu(fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 333, 64, generator=g) * torch.linspace(0.2, 4, 64)
    prior = torch.randn(3, 64, generator=g) * 0.3
    cpu = fake_quantize_sequence(x, fmt, 64, True, prior)
    gpu = fake_quantize_sequence(x.cuda(), fmt, 64, True, prior.cuda()).cpu()
    # float differences may flip a rounding here and there: compare the error, not the bits
    ref_err = (cpu - x).pow(2).mean()
    assert (gpu - x).pow(2).mean() == pytest.approx(ref_err, rel=0.02)
    # a flipped code moves a value by a quantization step; fp16-rounding noise in a scale moves it
    # by ~1e-3 relative: count only the former
    flips = ((gpu - cpu).abs() > 0.05 * x.std()).float().mean()
    assert flips < 0.01, f"{flips:.2%} of values differ by a quantization step between CUDA and CPU"
    enc = encode_tiles(x[:, :1, 64:128].cuda(), fmt, fmt.bits[0], prior[:1][None].cuda())
    assert enc.codes.is_cuda
    dec = decode_tiles(enc, fmt, 64, prior[:1][None].cuda())
    assert torch.allclose(dec.cpu(), fake_quantize_sequence(x[:, :1, 64:128].cuda(), fmt.with_bits(fmt.bits[:1]), 64, False, prior[:1].cuda()).cpu())


def _tiny_lm(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kvarn.models import LoadedModel

    words = [f"w{i} x{i % 7} y{i % 13}" for i in range(2000)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(words, vocab_size=400, min_frequency=1)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).cuda().eval()
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(words * 3))
    return LoadedModel(model, tok, "tiny-llama-cuda", "test"), text


def test_calibrate_eval_generate_on_cuda(tmp_path):
    from kvarn import api
    from kvarn.model_hook import uninstall
    from kvarn.runtime.hf_cache import KVarNCache

    lm, text = _tiny_lm(tmp_path)
    recipe, rep = api.calibrate(loaded=lm, calib=str(text), num_samples=2, seq_len=320, avg_bits=3.0,
                                output=tmp_path / "r.safetensors", progress=False)
    assert rep.bits_per_element <= 3.0
    held = tmp_path / "held.txt"
    held.write_text(text.read_text()[::-1])
    ev = api.evaluate(loaded=lm, recipe=tmp_path / "r.safetensors", text=str(held), num_windows=1, seq_len=320,
                      methods=["kvarn-k4v2-g128"], progress=False)
    assert [r.method.split(" ")[0] for r in ev.results] == ["fp16", "recipe", "kvarn-k4v2-g128"]
    cache = KVarNCache(recipe, lm.model)
    try:
        ids = torch.randint(0, len(lm.tokenizer), (1, 300), device="cuda")
        out = lm.model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    finally:
        uninstall(lm.model)
    assert out.shape == (1, 308) and cache.layers[0].tiles[0].is_cuda
