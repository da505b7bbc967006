"""Image-classification data sets behind one interface: the embedded digits, ImageFolder
directories, ``.npz`` arrays and Hugging Face ``datasets``.

``build_datasets(spec)`` returns (train, val, class_names). ``spec`` is ``"digits"`` (the
default: 5,000 real MNIST digits shipped inside esh), a directory with ``train/`` and ``val/``
class folders, a ``.npz`` file with ``images`` and ``labels`` arrays, or ``hf:NAME`` for a
Hugging Face dataset (local cache or hub).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from esh.errors import InputError

ASSETS = Path(__file__).parent / "assets"
DIGITS_FILE = ASSETS / "mnist_5k.npz"


def stratified_split(labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded split that keeps every class's share in both parts."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(len(idx) * val_fraction))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class ArrayDataset(Dataset):
    """uint8 images (N, H, W) or (N, H, W, C) with integer labels, as PIL images to a transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None):
        if len(images) != len(labels):
            raise InputError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i]).convert("RGB")  # grey digits -> 3 channels
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as f:
            images, labels = f["images"], f["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise InputError(
            f"{path}: expected a .npz file with 'images' (N, H, W[, C]) uint8 and 'labels' (N,): {e}"
        ) from e
    if images.ndim not in (3, 4) or labels.ndim != 1:
        raise InputError(f"{path}: images must be (N, H, W[, C]) and labels (N,); got {images.shape}, {labels.shape}")
    return images.astype(np.uint8), labels


class SafeImageFolder(Dataset):
    """torchvision's ImageFolder that skips unreadable images with a warning (and counts them)
    instead of crashing deep inside a long epoch."""

    def __init__(self, root: Path, transform: Callable | None = None):
        from esh._compat import import_torchvision

        tv = import_torchvision()
        try:
            self.folder = tv.datasets.ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as e:
            raise InputError(f"{root} is not an ImageFolder directory (one sub-folder of images per class): {e}") from e
        self.transform = transform
        self.classes = self.folder.classes
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, i: int):
        for k in range(len(self)):
            path, label = self.folder.samples[(i + k) % len(self)]
            try:
                with Image.open(path) as img:
                    img = img.convert("RGB")
            except OSError as e:
                if path not in self.skipped:
                    self.skipped.add(path)
                    warnings.warn(
                        f"skipping unreadable image {path} ({e}); {len(self.skipped)} skipped so far", stacklevel=2
                    )
                continue
            return (self.transform(img) if self.transform else img), label
        raise InputError(f"no readable image in {self.folder.root}")


class HFDataset(Dataset):
    def __init__(self, data, image_key: str, label_key: str, transform: Callable | None = None):
        self.data, self.image_key, self.label_key, self.transform = data, image_key, label_key, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        row = self.data[int(i)]
        img = row[self.image_key]
        img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
        img = img.convert("RGB")
        return (self.transform(img) if self.transform else img), int(row[self.label_key])


def _hf(name: str, seed: int):
    try:
        import datasets
    except ImportError as e:
        raise ImportError("--data hf:NAME needs the 'datasets' package: pip install datasets") from e
    if Path(name).is_dir():  # a dataset saved with save_to_disk
        ds = datasets.load_from_disk(name)
        ds = ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})
    else:  # a hub name: the local cache, or a download
        ds = datasets.load_dataset(name)
    split_names = list(ds.keys())
    train = ds["train"] if "train" in ds else ds[split_names[0]]
    val_name = next((s for s in ("validation", "val", "test") if s in ds), None)
    columns = train.column_names
    image_key = next((c for c in ("image", "img", "pixel_values") if c in columns), None)
    label_key = next((c for c in ("label", "labels", "fine_label") if c in columns), None)
    if image_key is None or label_key is None:
        raise InputError(f"hf:{name}: no image/label columns among {columns}")
    if val_name is None:
        tr, va = stratified_split(np.asarray(train[label_key]), seed=seed)
        val, train = train.select(va), train.select(tr)
    else:
        val = ds[val_name]
    feature = train.features[label_key]
    names = list(getattr(feature, "names", None) or map(str, sorted(set(train[label_key]))))
    return HFDataset(train, image_key, label_key), HFDataset(val, image_key, label_key), names


def build_datasets(spec: str | os.PathLike = "digits", seed: int = 0) -> tuple[Dataset, Dataset, list[str]]:
    """(train, val, class names), without transforms (set ``.transform`` on each)."""
    spec = str(spec)
    if spec == "digits":
        images, labels = _load_npz(DIGITS_FILE)
        tr, va = stratified_split(labels, 0.2, seed=0)  # fixed: 4,000 / 1,000, 400 / 100 per class
        return ArrayDataset(images[tr], labels[tr]), ArrayDataset(images[va], labels[va]), [str(i) for i in range(10)]
    if spec.startswith("hf:"):
        return _hf(spec[3:], seed)
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            raise InputError(f"data file {path} does not exist")
        images, labels = _load_npz(path)
        tr, va = stratified_split(labels, 0.2, seed=seed)
        names = [str(c) for c in np.unique(labels)]
        return ArrayDataset(images[tr], labels[tr]), ArrayDataset(images[va], labels[va]), names
    if not path.is_dir():
        raise InputError(f"--data {spec}: not 'digits', 'hf:NAME', a .npz file or a directory")
    if not (path / "train").is_dir() or not (path / "val").is_dir():
        raise InputError(f"data directory {path} needs train/ and val/ sub-folders of class folders")
    train, val = SafeImageFolder(path / "train"), SafeImageFolder(path / "val")
    if train.classes != val.classes:
        raise InputError(f"{path}: train/ and val/ have different class folders")
    return train, val, train.classes


def collate_check(num_classes: int, labels: torch.Tensor, where: str) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"{where}: label {int(labels.max())} does not fit num_classes={num_classes}")
