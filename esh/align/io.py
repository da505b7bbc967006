"""Reading embedding files: ``.npy`` (n, d), ``.npz`` (first array or ``embeddings``) and
``.parquet`` (a list-valued column, by default ``embedding``, or all numeric columns)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .metrics import AlignmentInputError


def load_embeddings(path: str | os.PathLike, column: str | None = None) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise AlignmentInputError(f"embedding file {p} does not exist")
    if p.suffix == ".npy":
        return np.load(p)
    if p.suffix == ".npz":
        with np.load(p) as f:
            return f[column or ("embeddings" if "embeddings" in f else f.files[0])]
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading .parquet needs pyarrow: pip install pyarrow") from e
        table = pq.read_table(p)
        name = column or ("embedding" if "embedding" in table.column_names else None)
        if name is not None:
            return np.stack(table.column(name).to_numpy(zero_copy_only=False)).astype(np.float32)
        return np.column_stack([table.column(c).to_numpy() for c in table.column_names]).astype(np.float32)
    raise AlignmentInputError(f"{p}: expected a .npy, .npz or .parquet file of embeddings")


def load_layers(path: str | os.PathLike) -> list[np.ndarray]:
    """The ``layer_i`` arrays of an ``esh embed --layers`` file (.npz or .parquet), in order."""
    p = Path(path)
    if p.suffix == ".npz":
        with np.load(p) as f:
            names = [n for n in f.files if n.startswith("layer_")]
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = [n for n in pq.read_schema(p).names if n.startswith("layer_")]
    else:
        raise AlignmentInputError(f"{p}: layer-wise alignment needs a .npz or .parquet file from esh embed --layers")
    if not names:
        raise AlignmentInputError(f"{p} has no layer_i columns: write it with esh embed --layers")
    names.sort(key=lambda n: int(n.split("_")[1]))
    return [load_embeddings(p, column=n) for n in names]
