"""Compile the Triton kernels a serving engine will launch before it serves.

Why: Triton compiles a kernel the first time it meets a new set of constexprs. In a serving burst
those first times came mid-step, as the batch grew (H200, 2026-12-03: ~12 s of a 57 s burst before
the per-step integers stopped being specialized). What still varies at run time is the combine
kernel's power-of-two partial bucket (one per split count class) and the width pairs of a recipe's
head groups; this runs each once on tiny inputs, when the engine builds its model.
"""

from __future__ import annotations

import logging

import torch

from .layout import PageLayout

logger = logging.getLogger(__name__)

SPLIT_CLASSES = (1, 2, 4, 8, 16, 32)  # one per combine bucket: next_pow2(splits + 1) = 2, 4, ..., 64


def warm_up(layouts: list[PageLayout], num_q_heads: int, dtype: torch.dtype, device) -> int:
    """Run the decode op (every split class), the store and the dequant op once per distinct layout on dummy
    data; returns how many layouts were run. Failures are logged, never raised: serving works
    without a warm-up, only its first steps are slower."""
    from .decode import triton as dec
    from .dequant import dequant_tiles
    from .store import store_tiles

    device = torch.device(device)
    seen, done = set(), 0
    for lay in layouts:
        key = repr(lay.fmt)  # the kernels' constexprs come from the format alone
        if key in seen:
            continue
        seen.add(key)
        h, g, d = lay.num_kv_heads, lay.tile, lay.head_dim
        try:
            pages = torch.zeros(2, lay.nbytes + lay.nbytes % 2, dtype=torch.uint8, device=device)
            staging = torch.zeros(1, 2, h, g, d, dtype=torch.float16, device=device)
            q = torch.randn(1, num_q_heads, d, device=device).to(dtype)
            i32 = lambda v: torch.tensor([v], dtype=torch.int32, device=device)  # noqa: E731
            table = torch.ones(1, 1, dtype=torch.int32, device=device)
            for splits in SPLIT_CLASSES:
                dec.decode(lay, pages, staging, q, table, i32(0), i32(1), i32(-1), i32(0), i32(1), d ** -0.5,
                           num_splits=splits)
            tile = torch.randn(1, h, g, d, device=device).half()
            one = torch.ones(1, dtype=torch.int64, device=device)
            store_tiles(lay, pages, tile, tile, one)
            dequant_tiles(lay, pages, one, dtype)
            done += 1
        except Exception as e:  # noqa: BLE001 - a warm-up must not stop the engine
            logger.warning("kvarn: kernel warm-up failed (%s: %s); the first serving steps compile instead",
                           type(e).__name__, str(e)[:200])
            return done
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done
