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
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from esh.data.images import array_to_uint8, load_image, scan_image_folder, to_8bit
from esh.errors import InputError, require

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
    """uint8 images (N, H, W) or (N, H, W, C) with integer labels, as PIL RGB images to a transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None):
        if len(images) != len(labels):
            raise InputError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i]).convert("RGB")  # grey digits -> 3 channels
        return (self.transform(img) if self.transform else img), int(self.labels[i])


NPZ_LAYOUT = "a .npz file with 'images' (N, H, W) or (N, H, W, C) with C = 1, 3 or 4, and integer 'labels' (N,)"


def load_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images, class indices 0..K-1, K class names) from a ``.npz`` data file.

    Counts, shapes, dtypes and values are checked: as many labels as images, channels last
    (1, 3 or 4), whole-number labels >= 0, finite pixels. Float pixels in [0, 1] are scaled to
    0..255 and 16-bit pixels divided by 257 (see :func:`esh.data.images.array_to_uint8`), over the
    whole array so every image keeps the same scale. The labels found become the classes in
    sorted order (labels 3 and 7 are classes "3" and "7", indices 0 and 1)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist")
    try:
        with np.load(path) as f:
            missing = [k for k in ("images", "labels") if k not in f.files]
            if missing:
                raise InputError(f"{path}: expected {NPZ_LAYOUT}; it has no {' or '.join(missing)} (arrays: {f.files})")
            images, labels = f["images"], f["labels"]
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as e:
        raise InputError(
            f"{path}: expected {NPZ_LAYOUT}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if images.ndim not in (3, 4) or labels.ndim != 1:
        raise InputError(f"{path}: expected {NPZ_LAYOUT}; got images {images.shape} and labels {labels.shape}")
    if images.ndim == 4 and images.shape[-1] not in (1, 3, 4):
        hint = " (channels first? store them channels last)" if images.shape[1] in (1, 3, 4) else ""
        raise InputError(f"{path}: images must have 1, 3 or 4 channels last; got shape {images.shape}{hint}")
    if len(images) != len(labels):
        raise InputError(f"{path}: {len(images)} images but {len(labels)} labels; every image needs one label")
    if len(images) == 0:
        raise InputError(f"{path}: no images")
    if labels.dtype.kind == "f" and np.isfinite(labels).all() and (labels == np.round(labels)).all():
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise InputError(f"{path}: labels must be whole numbers (class indices); got dtype {labels.dtype}")
    if labels.min() < 0:
        raise InputError(f"{path}: labels must be >= 0; found {int(labels.min())}")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    images = array_to_uint8(images, str(path))
    values, indices = np.unique(labels, return_inverse=True)
    return images, indices.astype(np.int64), [str(v) for v in values]


class ImageFolderDataset(Dataset):
    """A class-folder tree (``root/<class>/<image>``) of the images that decode: unreadable
    files are found once, up front (:func:`esh.data.images.scan_image_folder`), left out of the
    index and reported in one warning; ``skipped`` lists them with their reasons."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None):
        scan = scan_image_folder(root)
        self.root, self.classes, self.samples, self.skipped = scan.root, scan.classes, scan.samples, scan.skipped
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        if scan.skipped:
            warnings.warn(scan.note(), stacklevel=2)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = load_image(path)  # readable at the scan: an error now (file changed) names it
        return (self.transform(img) if self.transform else img), label


class HFDataset(Dataset):
    def __init__(self, data, image_key: str, label_key: str, transform: Callable | None = None):
        self.data, self.image_key, self.label_key, self.transform = data, image_key, label_key, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        row = self.data[int(i)]
        img = row[self.image_key]
        img = to_8bit(img) if isinstance(img, Image.Image) else Image.fromarray(array_to_uint8(np.asarray(img)))
        img = img.convert("RGB")
        return (self.transform(img) if self.transform else img), int(row[self.label_key])


def _hf(name: str, seed: int):
    datasets = require("datasets", "data", "--data hf:NAME")
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
        images, labels, names = load_npz(DIGITS_FILE)
        tr, va = stratified_split(labels, 0.2, seed=0)  # fixed: 4,000 / 1,000, 400 / 100 per class
        return ArrayDataset(images[tr], labels[tr]), ArrayDataset(images[va], labels[va]), names
    if spec.startswith("hf:"):
        return _hf(spec[3:], seed)
    path = Path(spec)
    if path.suffix == ".npz":
        images, labels, names = load_npz(path)
        tr, va = stratified_split(labels, 0.2, seed=seed)
        return ArrayDataset(images[tr], labels[tr]), ArrayDataset(images[va], labels[va]), names
    if not path.is_dir():
        raise InputError(f"--data {spec}: not 'digits', 'hf:NAME', a .npz file or a directory")
    if not (path / "train").is_dir() or not (path / "val").is_dir():
        raise InputError(f"data directory {path} needs train/ and val/ sub-folders of class folders")
    train, val = ImageFolderDataset(path / "train"), ImageFolderDataset(path / "val")
    if train.classes != val.classes:
        raise InputError(f"{path}: train/ and val/ have different class folders")
    return train, val, train.classes


def collate_check(num_classes: int, labels: torch.Tensor, where: str) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise InputError(f"{where}: label {int(labels.max())} does not fit num_classes={num_classes}")
