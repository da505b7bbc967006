"""A small ``.npz`` of real digits for the trainer tests (imported by the test modules here)."""

from __future__ import annotations

import numpy as np

from esh.data.datasets import DIGITS_FILE


def small_npz(path, n_per_class=16, classes=4):
    """The first ``n_per_class`` embedded digits of each of ``classes`` classes, written to ``path``."""
    with np.load(DIGITS_FILE) as f:
        images, labels = f["images"], f["labels"]
    keep = np.concatenate([np.flatnonzero(labels == c)[:n_per_class] for c in range(classes)])
    np.savez_compressed(path, images=images[keep], labels=labels[keep])
    return path
