"""Every layer of A against every layer of B: the score matrix, the best pair, a heatmap."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from esh._io import save_figure

from .metrics import score


def layerwise(
    layers_a: Sequence, layers_b: Sequence, metric: str = "mknn", k: int = 10, clip_quantile: float | None = None
) -> np.ndarray:
    """(len(layers_a), len(layers_b)) scores; ``metric`` is one of ``esh.align.METRICS``."""
    scores = np.zeros((len(layers_a), len(layers_b)))
    for i, a in enumerate(layers_a):
        for j, b in enumerate(layers_b):
            scores[i, j] = score(a, b, metric, k=k, clip_quantile=clip_quantile)
    return scores


def best_pair(scores: np.ndarray) -> tuple[int, int, float]:
    i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return int(i), int(j), float(scores[i, j])


def save_heatmap(
    scores: np.ndarray, path: str | os.PathLike, names: tuple[str, str] = ("A", "B"), title: str = ""
) -> Path:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 0.3 * scores.shape[1]), max(4.0, 1.5 + 0.3 * scores.shape[0])))
    im = ax.imshow(scores, origin="lower", cmap="viridis", aspect="auto")
    i, j, v = best_pair(scores)
    ax.scatter([j], [i], marker="*", s=120, c="red", label=f"best: {names[0]} {i} / {names[1]} {j} = {v:.3f}")
    ax.set(xlabel=f"{names[1]} layer", ylabel=f"{names[0]} layer", title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=8, frameon=False)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
