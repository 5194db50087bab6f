import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter where no GPU is (set before triton imports).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores: more threads than cores makes every small op slower.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M (converted once, cached under KVARN_CACHE)."""
    from kvarn.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def small_recipe(smollm, tmp_path_factory):
    """A real recipe for SmolLM2: 1 calibration window of 384 tokens, 2.6 bits/element."""
    from kvarn import api

    out = tmp_path_factory.mktemp("recipe") / "kvarn_recipe.safetensors"
    recipe, report = api.calibrate(calib="wiki:first", num_samples=1, seq_len=384, avg_bits=2.6,
                                   output=out, progress=False, loaded=smollm)
    return out, recipe, report


def one_line(msg: str) -> bool:
    return "\n" not in msg.strip() and len(msg.strip()) > 0
