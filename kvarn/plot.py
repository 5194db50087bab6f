"""PNG pictures: bit allocation heatmap."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def plot_bits_heatmap(recipe, path: str | os.PathLike) -> Path:
    """Two heatmaps (K, V) of code bits per layer (rows) and KV head (columns); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    L, H = recipe.k_bits.shape
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 0.6 * H * 2, 1.5 + 0.22 * L), sharey=True)
    vmax = max(int(recipe.k_bits.max()), int(recipe.v_bits.max()))
    for ax, name, bits in ((axes[0], "keys", recipe.k_bits), (axes[1], "values", recipe.v_bits)):
        im = ax.imshow(bits.numpy(), aspect="auto", cmap="viridis", vmin=1, vmax=vmax)
        for l in range(L):
            for h in range(H):
                ax.text(h, l, str(int(bits[l, h])), ha="center", va="center", fontsize=7, color="white" if bits[l, h] < vmax * 0.6 else "black")
        ax.set_title(f"{name}: bits per head")
        ax.set_xlabel("KV head")
        ax.set_xticks(range(H))
    axes[0].set_ylabel("layer")
    fig.suptitle(f"{recipe.model_id}\n{recipe.bits_per_element():.3f} bits/element, {recipe.compression():.2f}x vs fp16", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8, label="bits")
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
