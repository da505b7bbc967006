"""Reading embedding files: ``.npy`` (n, d), ``.npz`` (``--column``, else ``embeddings``,
``embedding`` or the first array) and ``.parquet`` (a list-valued column, by default
``embedding``, or all numeric columns). Every file comes back as a numeric (n, d) array, or
as one :class:`AlignmentInputError` that says what was expected."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from .metrics import AlignmentInputError

_FORMATS = ".npy, .npz or .parquet"


def _numeric(arr: np.ndarray, where: str) -> np.ndarray:
    """``arr`` as an (n, d) float array, or an error naming ``where`` and what it holds."""
    if arr.dtype.kind not in "biuf":
        raise AlignmentInputError(f"{where} holds {arr.dtype} values; embeddings must be numbers")
    if arr.ndim != 2:
        raise AlignmentInputError(f"{where} must be a 2-D (items, features) array; got shape {arr.shape}")
    return arr


def _reason(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _read_npz(p: Path, column: str | None) -> np.ndarray:
    with np.load(p) as f:
        if not f.files:
            raise AlignmentInputError(f"{p} holds no arrays")
        if column is not None and column not in f.files:
            raise AlignmentInputError(f"{p} has no array {column!r}; it has {', '.join(f.files)}")
        name = column or next((n for n in ("embeddings", "embedding") if n in f.files), f.files[0])
        return _numeric(f[name], f"{p}[{name!r}]")


def _read_parquet(p: Path, column: str | None) -> np.ndarray:
    from esh.errors import require

    pq = require("pyarrow.parquet", "data", "reading .parquet embeddings")
    table = pq.read_table(p)
    if column is not None and column not in table.column_names:
        raise AlignmentInputError(f"{p} has no column {column!r}; it has {', '.join(table.column_names)}")
    name = column or ("embedding" if "embedding" in table.column_names else None)
    if name is not None:
        rows = table.column(name).to_numpy(zero_copy_only=False)
        try:
            arr = np.stack([np.asarray(r) for r in rows]) if rows.dtype == object else rows[:, None]
        except ValueError:
            raise AlignmentInputError(f"{p}: column {name!r} has rows of different lengths") from None
        return _numeric(arr, f"{p}[{name!r}]").astype(np.float32)
    numeric = [c for c in table.column_names if table.column(c).to_numpy(zero_copy_only=False).dtype.kind in "biuf"]
    if not numeric:
        found = ", ".join(table.column_names)
        raise AlignmentInputError(f"{p}: no 'embedding' column and no numeric columns ({found})")
    return np.column_stack([table.column(c).to_numpy() for c in numeric]).astype(np.float32)


def load_embeddings(path: str | os.PathLike, column: str | None = None) -> np.ndarray:
    """The (n, d) embeddings in ``path``; ``column`` picks the array (.npz) or column (.parquet)."""
    p = Path(path)
    if not p.exists():
        raise AlignmentInputError(f"embedding file {p} does not exist")
    if not p.is_file():
        raise AlignmentInputError(f"embedding file {p} is not a regular file")
    if p.suffix not in (".npy", ".npz", ".parquet"):
        raise AlignmentInputError(f"{p}: expected a {_FORMATS} file of embeddings")
    if column is not None and p.suffix == ".npy":
        raise AlignmentInputError(f"--column picks an array of a .npz or a column of a .parquet; {p} is a .npy")
    try:
        if p.suffix == ".npy":
            return _numeric(np.load(p), str(p))
        if p.suffix == ".npz":
            return _read_npz(p, column)
        return _read_parquet(p, column)
    except AlignmentInputError:
        raise
    except PermissionError:
        raise AlignmentInputError(f"cannot read {p}: permission denied") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise AlignmentInputError(f"{p} is not a readable {p.suffix} file of embeddings: {_reason(e)}") from None
    except Exception as e:  # noqa: BLE001 - pyarrow's parse errors (ArrowInvalid, ...) on a corrupt file
        if type(e).__module__.startswith("pyarrow"):
            raise AlignmentInputError(f"{p} is not a readable .parquet file of embeddings: {_reason(e)}") from None
        raise


def load_layers(path: str | os.PathLike) -> list[np.ndarray]:
    """The ``layer_i`` arrays of an ``esh embed --layers`` file (.npz or .parquet), in order."""
    p = Path(path)
    if not p.is_file():
        raise AlignmentInputError(f"embedding file {p} does not exist")
    try:
        if p.suffix == ".npz":
            with np.load(p) as f:
                names = [n for n in f.files if n.startswith("layer_")]
        elif p.suffix == ".parquet":
            from esh.errors import require

            names = [n for n in require("pyarrow.parquet", "data", "reading .parquet").read_schema(p).names]
            names = [n for n in names if n.startswith("layer_")]
        else:
            raise AlignmentInputError(
                f"{p}: layer-wise alignment needs a .npz or .parquet file from esh embed --layers"
            )
    except AlignmentInputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise AlignmentInputError(f"{p} is not a readable {p.suffix} file of embeddings: {_reason(e)}") from None
    except Exception as e:  # noqa: BLE001 - pyarrow's parse errors on a corrupt file
        if type(e).__module__.startswith("pyarrow"):
            raise AlignmentInputError(f"{p} is not a readable .parquet file: {_reason(e)}") from None
        raise
    names = [n for n in names if n.split("_", 1)[1].isdigit()]
    if not names:
        raise AlignmentInputError(f"{p} has no layer_i columns: write it with esh embed --layers")
    names.sort(key=lambda n: int(n.split("_")[1]))
    return [load_embeddings(p, column=n) for n in names]
