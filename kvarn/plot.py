"""PNG pictures: bit allocation heatmap.

Each stored width has one fixed colour (``WIDTH_COLORS``), the same in every plot, and the legend
always lists all of them, so the heatmaps of two recipes compare at a glance whatever widths each
one uses. The colours run from warm (few bits) to cool (many): a dark red, then Okabe-Ito's
colour-blind-safe orange, yellow, sky blue and blue, and every cell is labelled with its width.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# width in bits -> (fill, text colour); 16 = kept fp16
WIDTH_COLORS = {
    2: ("#B2182B", "white"),   # dark red
    3: ("#E69F00", "black"),   # orange
    4: ("#F0E442", "black"),   # yellow
    8: ("#56B4E9", "black"),   # sky blue
    16: ("#0072B2", "white"),  # blue
}
OTHER_COLOR = ("#999999", "black")  # a width outside the table (a recipe with 1-bit heads)


def width_color(bits: int) -> str:
    """The fill colour of a head stored at ``bits`` bits (grey for a width outside the table)."""
    return WIDTH_COLORS.get(int(bits), OTHER_COLOR)[0]


def _rgb(bits):
    """``[L, H]`` widths -> ``[L, H, 3]`` floats in [0, 1], one fixed colour per width."""
    import numpy as np
    from matplotlib.colors import to_rgb

    b = bits.numpy() if hasattr(bits, "numpy") else np.asarray(bits)
    out = np.zeros((*b.shape, 3))
    for w in np.unique(b):
        out[b == w] = to_rgb(width_color(int(w)))
    return out


def plot_bits_heatmap(recipe, path: str | os.PathLike) -> Path:
    """Two heatmaps (K, V) of code bits per layer (rows) and KV head (columns), each cell in its
    width's fixed colour and labelled with the width; a legend of every width. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    path = Path(path)
    L, H = recipe.k_bits.shape
    fig, axes = plt.subplots(1, 2, figsize=(3.2 + 0.55 * H * 2, 1.6 + 0.22 * L), sharey=True)
    extra = sorted({int(b) for b in recipe.k_bits.unique().tolist() + recipe.v_bits.unique().tolist()} - set(WIDTH_COLORS))
    for ax, name, bits in ((axes[0], "keys", recipe.k_bits), (axes[1], "values", recipe.v_bits)):
        ax.imshow(_rgb(bits), aspect="auto", interpolation="nearest")
        for l in range(L):
            for h in range(H):
                b = int(bits[l, h])
                ax.text(h, l, str(b), ha="center", va="center", fontsize=7,
                        color=WIDTH_COLORS.get(b, OTHER_COLOR)[1])
        ax.set_title(f"{name}: bits per head", fontsize=9)
        ax.set_xlabel("KV head")
        ax.set_xticks(range(H))
    axes[0].set_ylabel("layer")
    axes[0].set_yticks(range(0, L, max(1, L // 15)))
    handles = [Patch(facecolor=c, edgecolor="0.3", label=f"{w} bits" if w != 16 else "16 (fp16)")
               for w, (c, _) in WIDTH_COLORS.items()]
    handles += [Patch(facecolor=OTHER_COLOR[0], edgecolor="0.3", label=f"{w} bits") for w in extra]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), title="stored width", fontsize=8,
               title_fontsize=8, frameon=False)
    fig.suptitle(f"{recipe.model_id}\n{recipe.bits_per_element():.3f} bits/element, {recipe.compression():.2f}x vs fp16",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path
