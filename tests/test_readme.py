"""The README's Python block runs as written, in a folder where ``./my-model`` is a model folder
(the embedded SmolLM2 as converted by kvarn, its files linked, not copied)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


@pytest.mark.slow
def test_readme_python_block_runs_as_written(smollm, tmp_path, monkeypatch, capsys):
    from kvarn.models import embedded_gguf_path, gguf_cache_path

    (block,) = python_blocks((ROOT / "README.md").read_text())
    converted = gguf_cache_path(embedded_gguf_path())
    assert (converted / "config.json").is_file(), converted  # written by the smollm fixture's load
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    for f in converted.iterdir():
        (model_dir / f.name).symlink_to(f)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, str(ROOT / "README.md"), "exec"), scope)

    assert (model_dir / "kvarn" / "recipe.safetensors").is_file()
    rows = {r.method: r for r in scope["table"].results}
    assert set(rows) == {"fp16", "recipe (recipe.safetensors)"}
    assert abs(rows["recipe (recipe.safetensors)"].delta_ppl_pct) < 10
    out, cache = scope["out"], scope["cache"]
    assert out.shape[1] == scope["input_ids"].shape[1] + 64
    assert cache.get_seq_length() == out.shape[1] - 1 and cache.nbytes() > 0
    printed = capsys.readouterr().out
    assert "bytes of KV cache" in printed and "fp16" in printed
