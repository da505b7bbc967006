"""Embedding a whole data set to a file: batched, sharded and written atomically.

A killed run resumes at the first missing shard, but only from shards of the same run: the
shard folder holds a fingerprint of everything that determines the rows (the adapter's model,
weights digest, pooling, preprocessing and dtype; the data and its file list; the layers
option; the shard size; the esh version). On any difference the old shards are removed and the
run starts over, with a one-line note saying what changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset, Subset

from esh._io import atomic_path, atomic_write, clean_stale_temps, write_text
from esh._version import __version__
from esh.data.datasets import DIGITS_FILE, ArrayDataset, ImageFolderDataset, _hf, load_npz
from esh.errors import InputError

FINGERPRINT_FILE = "fingerprint.json"


class ShardsReplaced(UserWarning):
    """Shards left by an earlier run of another model, data or option were removed."""


def _all_items(spec: str) -> Dataset:
    """Every image of a data spec: ``digits``, FILE.npz, hf:NAME (its train split), or a
    directory of class folders (unreadable images left out, with one warning)."""
    if spec == "digits":
        return ArrayDataset(*load_npz(DIGITS_FILE)[:2])
    if spec.endswith(".npz"):
        return ArrayDataset(*load_npz(spec)[:2])
    if spec.startswith("hf:"):
        return _hf(spec[3:], seed=0)[0]
    if not Path(spec).is_dir():
        raise InputError(f"--data {spec}: not 'digits', 'hf:NAME', a .npz file or a directory")
    return ImageFolderDataset(spec)


def _file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(spec: str, dataset: Dataset) -> str:
    """A digest of the items a data spec yields: the file's bytes for a ``.npz``, the readable
    files (relative path, class, size, modification time) and the skipped ones for a folder,
    the dataset's own fingerprint for ``hf:``, the version of esh for ``digits``."""
    h = hashlib.sha256()
    if spec == "digits":
        h.update(b"digits")
    elif spec.endswith(".npz"):
        h.update(_file_digest(spec).encode())
    elif isinstance(dataset, ImageFolderDataset):
        h.update(",".join(dataset.classes).encode())
        for path, label in dataset.samples:
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, dataset.root)}:{label}:{st.st_size}:{st.st_mtime_ns};".encode())
        for path, _ in dataset.skipped:
            h.update(f"skipped {os.path.relpath(path, dataset.root)};".encode())
    else:
        data = getattr(dataset, "data", None)
        h.update(f"{spec}:{getattr(data, '_fingerprint', None)}:{len(dataset)}".encode())
    return h.hexdigest()


def _fingerprint(adapter, spec: str, dataset: Dataset, layers: bool, shard_size: int) -> dict[str, str]:
    own = getattr(adapter, "fingerprint", None)
    # an adapter that cannot describe itself never resumes: a fresh token each run
    model = own() if callable(own) else {"adapter": f"{type(adapter).__name__} (unverifiable) {os.urandom(8).hex()}"}
    return {
        **model,
        "data": data_fingerprint(spec, dataset),
        "items": str(len(dataset)),
        "layers": str(bool(layers)),
        "shard_size": str(shard_size),
        "esh": __version__,
    }


def _prepare_shards(shards_dir: Path, fingerprint: dict[str, str]) -> None:
    """Keep ``shards_dir`` when it holds shards of this very run; otherwise empty it, with a
    note naming what differs. Temporary files of killed runs are removed either way."""
    clean_stale_temps(shards_dir)
    stamp = shards_dir / FINGERPRINT_FILE
    if shards_dir.is_dir() and any(shards_dir.iterdir()):
        try:
            old = json.loads(stamp.read_text())
        except (OSError, ValueError):
            old = None
        if old == fingerprint:
            return
        if isinstance(old, dict):
            changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            why = f"another {', '.join(changed)}"
        else:
            why = "no fingerprint of their run"
        warnings.warn(f"{shards_dir} holds shards of another run ({why}); starting over", ShardsReplaced, stacklevel=3)
        shutil.rmtree(shards_dir)
    shards_dir.mkdir(parents=True, exist_ok=True)
    write_text(stamp, json.dumps(fingerprint, indent=1, sort_keys=True))


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def _write_output(out: Path, merged: dict[str, np.ndarray]) -> None:
    if out.suffix == ".npy":
        with atomic_write(out, "wb") as f:
            np.save(f, merged["embedding"])
    elif out.suffix == ".npz":
        _save_npz(out, merged)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {"label": merged["label"]}
        columns.update({k: list(v) for k, v in merged.items() if k != "label"})
        with atomic_path(out) as tmp:
            pq.write_table(pa.table(columns), str(tmp))


def embed_dataset(
    adapter,
    data: str,
    out: str | os.PathLike,
    batch_size: int = 32,
    layers: bool = False,
    shard_size: int = 2048,
    workers: int = 0,
    progress: bool = True,
) -> Path:
    """Embed every image of ``data`` into ``out`` (.npy: (n, D) float32; .npz: ``embedding``,
    ``label`` and ``layer_i`` arrays; .parquet: the same as columns).

    Rows follow the data's order; unreadable images of a folder are left out (counted in one
    warning). Shards go to ``OUT.shards/`` and are merged at the end; a rerun of the same
    command resumes from them, any other run starts over (see the module docstring)."""
    from tqdm.auto import tqdm

    out = Path(out)
    if out.suffix not in (".npy", ".npz", ".parquet"):
        raise InputError(f"--out must end in .npy, .npz or .parquet; got {out}")
    if layers and out.suffix == ".npy":
        raise InputError("--layers needs a .npz or .parquet output (one array per block)")
    for what, value in (("batch size", batch_size), ("shard size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"the {what} must be a positive integer; got {value!r}")
    if workers < 0:
        raise InputError(f"workers must be >= 0; got {workers}")
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; give a file name ending in .npy, .npz or .parquet")
    if out.suffix == ".parquet":
        from esh.errors import require

        require("pyarrow", "data", "--out FILE.parquet")
    spec = str(data)
    dataset = _all_items(spec)
    dataset.transform = adapter.preprocessor()
    n = len(dataset)
    if n == 0:
        raise InputError(f"--data {spec} has no images")
    shards_dir = out.with_name(out.name + ".shards")
    clean_stale_temps(out.parent)
    _prepare_shards(shards_dir, _fingerprint(adapter, spec, dataset, layers, shard_size))
    spans = [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]
    bar = tqdm(total=n, desc=f"embed {out.name}", unit="img", disable=not progress)
    for i, (start, stop) in enumerate(spans):
        shard = shards_dir / f"{i:06d}.npz"
        if shard.exists():  # done by an earlier, interrupted run of this same command
            bar.update(stop - start)
            continue
        loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, num_workers=workers)
        embs, labels, per_layer = [], [], []
        for images, targets in loader:
            embs.append(adapter.embed(images).detach().cpu().numpy())  # --device cuda: to the host first
            labels.append(np.asarray(targets))
            if layers:
                per_layer.append([t.detach().cpu().numpy() for t in adapter.embed_layers(images)])
            bar.update(len(images))
        arrays = {"embedding": np.concatenate(embs), "label": np.concatenate(labels)}
        if layers:
            for j in range(len(per_layer[0])):
                arrays[f"layer_{j}"] = np.concatenate([p[j] for p in per_layer])
        _save_npz(shard, arrays)
    bar.close()
    parts = []
    for i in range(len(spans)):
        with np.load(shards_dir / f"{i:06d}.npz") as f:
            parts.append(dict(f))
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    _write_output(out, merged)
    with contextlib.suppress(OSError):
        shutil.rmtree(shards_dir)
    return out


__all__ = ["ShardsReplaced", "data_fingerprint", "embed_dataset"]
