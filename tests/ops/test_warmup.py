"""``kvarn.ops.warmup``: runs the decode op over every split class and the store op once per
distinct layout (the Triton kernels under the interpreter here), and a failure is logged, not raised."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from kvarn.ops.layout import PageLayout  # noqa: E402
from kvarn.ops.warmup import warm_up  # noqa: E402
from kvarn.quant.formats import LayerFormat, TensorFormat  # noqa: E402


DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _layout(kbits, vbits, d=32, g=16):
    if DEV == "cuda":  # compiled, tl.dot wants >= 16 rows per operand: the serving shapes' smallest
        d, g = 64, 64
    h = len(kbits)
    fmt = LayerFormat(d, g, TensorFormat(kbits, "channel", "none", clip=True), TensorFormat(vbits, "token", "static", clip=True))
    return PageLayout(fmt, torch.zeros(h, d), torch.zeros(h, d))


def test_warm_up_runs_each_distinct_layout_once(monkeypatch):
    from kvarn.ops.decode import triton as dec

    splits = []
    real = dec.decode
    monkeypatch.setattr(dec, "decode", lambda *a, **k: splits.append(k["num_splits"]) or real(*a, **k))
    a, b = _layout((4, 2), (2, 4)), _layout((3, 3), (2, 2))
    assert warm_up([a, a, b, a], 4, torch.float16, DEV) == 2
    assert splits == [1, 2, 4, 8, 16, 32] * 2


def test_warm_up_failure_is_logged_not_raised(monkeypatch, caplog):
    from kvarn.ops.decode import triton as dec

    def boom(*a, **k):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(dec, "decode", boom)
    with caplog.at_level(logging.WARNING, logger="kvarn.ops.warmup"):
        assert warm_up([_layout((4, 2), (2, 4))], 4, torch.float16, "cpu") == 0
    assert any("warm-up failed" in r.getMessage() and "no kernel today" in r.getMessage() for r in caplog.records)
