"""Embedding a whole data set to a file: batched, sharded (a killed run resumes at the first
missing shard) and written atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset, Subset

from esh.data.datasets import DIGITS_FILE, ArrayDataset, SafeImageFolder, _hf, _load_npz
from esh.errors import InputError


def _all_items(spec: str) -> Dataset:
    """Every image of a data spec: ``digits``, FILE.npz, hf:NAME (its train split), or a
    directory of class folders (ImageFolder)."""
    if spec == "digits":
        return ArrayDataset(*_load_npz(DIGITS_FILE))
    if spec.endswith(".npz"):
        return ArrayDataset(*_load_npz(Path(spec)))
    if spec.startswith("hf:"):
        return _hf(spec[3:], seed=0)[0]
    if not Path(spec).is_dir():
        raise InputError(f"--data {spec}: not 'digits', 'hf:NAME', a .npz file or a directory")
    return SafeImageFolder(Path(spec))


def _atomic_np_save(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


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
    ``label`` and ``layer_i`` arrays; .parquet: the same as columns)."""
    from tqdm.auto import tqdm

    out = Path(out)
    if out.suffix not in (".npy", ".npz", ".parquet"):
        raise InputError(f"--out must end in .npy, .npz or .parquet; got {out}")
    if layers and out.suffix == ".npy":
        raise InputError("--layers needs a .npz or .parquet output (one array per block)")
    dataset = _all_items(str(data))
    dataset.transform = adapter.preprocessor()
    shards_dir = out.with_name(out.name + ".shards")
    shards_dir.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    spans = [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]
    bar = tqdm(total=n, desc=f"embed {out.name}", unit="img", disable=not progress)
    for i, (start, stop) in enumerate(spans):
        shard = shards_dir / f"{i:06d}.npz"
        if shard.exists():  # done by an earlier, interrupted run
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
        _atomic_np_save(shard, **arrays)
    bar.close()
    parts = [dict(np.load(shards_dir / f"{i:06d}.npz")) for i in range(len(spans))]
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}{out.suffix}")
    if out.suffix == ".npy":
        np.save(tmp, merged["embedding"])
    elif out.suffix == ".npz":
        np.savez(tmp, **merged)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {"label": merged["label"]}
        columns.update({k: list(v) for k, v in merged.items() if k != "label"})
        pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, out)
    shutil.rmtree(shards_dir)
    return out


__all__ = ["embed_dataset"]
