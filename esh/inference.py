"""Prediction and evaluation with any esh (or timm) image classifier.

Preprocessing is the model's own evaluation recipe, read from its ``pretrained_cfg``
(input size, crop_pct, crop mode, interpolation, mean, std) through timm's transforms.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from esh._compat import import_timm
from esh.devices import resolve_device
from esh.errors import InputError, is_whole
from esh.train.precision import autocast, enable_tf32


def eval_transform(model: nn.Module, img_size: int | None = None, crop_pct: float | None = None) -> Callable:
    """The model's evaluation preprocessing (timm ``create_transform`` from its pretrained_cfg);
    ``img_size`` and ``crop_pct`` (1.0: no border cropped off) override the model's values."""
    timm = import_timm()
    cfg = timm.data.resolve_data_config(model=model)
    if img_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], img_size, img_size)
    if crop_pct is not None:
        cfg["crop_pct"] = crop_pct
    return timm.data.create_transform(**cfg, is_training=False)


def load_image(path: str | os.PathLike):
    """An 8-bit RGB PIL image, or an InputError naming the file (``esh.data.images.load_image``:
    high-bit-depth pixels scaled, decompression bombs and non-regular files refused)."""
    from esh.data.images import load_image as _load

    return _load(path, "RGB")


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1K class descriptions in index order (shipped with timm)."""
    info = import_timm().data.ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


@dataclass
class Prediction:
    index: int
    name: str
    probability: float


@torch.inference_mode()
def predict(
    model: nn.Module,
    images: Sequence[str | os.PathLike],
    topk: int = 5,
    device: str | torch.device = "cpu",
    amp: bool = False,
    class_names: Sequence[str] | None = None,
    amp_dtype: str | None = None,
    img_size: int | None = None,
    crop_pct: float | None = None,
) -> list[list[Prediction]]:
    """Top-k classes with probabilities for each image file. ``class_names``: one per output
    (default: ImageNet's for a 1000-class model, else the indices); ``img_size``/``crop_pct``:
    see :func:`eval_transform`. ``amp``: autocast to ``amp_dtype`` (default: bfloat16 on CPU and
    on GPUs that have it, else float16)."""
    if not is_whole(topk, 1):
        raise InputError(f"topk must be a positive number of classes; got {topk!r}")
    if not images:
        raise InputError("predict needs at least one image")
    device = resolve_device(device)
    enable_tf32(device)
    model = model.eval().to(device)
    transform = eval_transform(model, img_size, crop_pct)
    batch = torch.stack([transform(load_image(p)) for p in images]).to(device)
    with autocast(device, amp, amp_dtype):
        probs = model(batch).float().softmax(-1)
    if class_names is None:
        class_names = imagenet_class_names() if probs.shape[-1] == 1000 else [str(i) for i in range(probs.shape[-1])]
    elif len(class_names) != probs.shape[-1]:
        raise InputError(f"{len(class_names)} class names for a model with {probs.shape[-1]} outputs")
    values, indices = probs.topk(min(topk, probs.shape[-1]), dim=-1)
    return [
        [Prediction(int(i), class_names[int(i)], float(v)) for v, i in zip(vs, idx)] for vs, idx in zip(values, indices)
    ]


def _evaluate_dataset(model, spec, batch_size, device, amp, workers, progress, img_size, amp_dtype, crop_pct) -> dict:
    """The validation split of a training data spec (``digits``, ``.npz``, ``hf:NAME``), with
    the same loaders as ``esh train`` and the model's evaluation transform."""
    from esh.data.datasets import build_datasets

    _, val, classes = build_datasets(spec)
    num_classes = getattr(model, "num_classes", None) or len(classes)
    if num_classes < len(classes):
        raise InputError(f"{spec} has {len(classes)} classes but the model predicts {num_classes}")
    val.transform = eval_transform(model, img_size, crop_pct)
    return _run_eval(
        model.eval().to(device),
        val,
        torch.arange(num_classes),
        spec,
        batch_size,
        device,
        amp,
        workers,
        progress,
        amp_dtype,
    )


def _label_map(classes: list[str], num_classes: int, class_names: Sequence[str] | None = None) -> list[int]:
    """Model output index for each folder: by name when the model's class names (an esh train
    checkpoint's) or ImageNet's synsets cover every folder, otherwise in order."""
    if class_names is not None and len(class_names) == num_classes and set(classes) <= set(class_names):
        return [list(class_names).index(c) for c in classes]
    info = import_timm().data.ImageNetInfo()
    synsets = {info.index_to_label_name(i): i for i in range(info.num_classes())}
    if num_classes == len(synsets) and all(c in synsets for c in classes):
        return [synsets[c] for c in classes]
    if len(classes) == num_classes:
        return list(range(num_classes))
    raise InputError(
        f"the data has {len(classes)} class folders ({', '.join(classes[:5])}...) but the model predicts "
        f"{num_classes} classes; name the folders by ImageNet synset (n01440764, ...) or use a model "
        f"with num_classes={len(classes)}"
    )


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    data_dir: str | os.PathLike,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    amp: bool = False,
    workers: int = 0,
    progress: bool = True,
    img_size: int | None = None,
    amp_dtype: str | None = None,
    crop_pct: float | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy on an ImageFolder directory (``DIR/<class>/<image>``; unreadable
    images are left out with a warning, as in training), or on the
    validation split of a training data spec (``digits``, ``FILE.npz``, ``hf:NAME``). ``amp``:
    autocast to ``amp_dtype`` (default: bfloat16 on CPU and on GPUs that have it, else float16).
    ``img_size``/``crop_pct``: see :func:`eval_transform`; ``class_names``: the model's, one per
    output, to match class folders by name."""
    from esh.data.datasets import ImageFolderDataset

    spec = str(data_dir)
    if not is_whole(batch_size, 1):
        raise InputError(f"batch_size must be a positive integer; got {batch_size!r}")
    device = resolve_device(device)
    enable_tf32(device)
    if spec == "digits" or spec.startswith("hf:") or spec.endswith(".npz"):
        return _evaluate_dataset(model, spec, batch_size, device, amp, workers, progress, img_size, amp_dtype, crop_pct)
    root = Path(data_dir)
    if not root.is_dir():
        raise InputError(f"data directory {root} does not exist")
    if (root / "val").is_dir() and not any(p.suffix for p in (root / "val").iterdir() if p.is_file()):
        root = root / "val"
    model = model.eval().to(device)
    # unreadable images are left out up front and reported in one warning, as in esh train
    dataset = ImageFolderDataset(root, transform=eval_transform(model, img_size, crop_pct))
    num_classes = getattr(model, "num_classes", None) or len(dataset.classes)
    target_map = torch.tensor(_label_map(dataset.classes, num_classes, class_names))
    return _run_eval(model, dataset, target_map, root.name, batch_size, device, amp, workers, progress, amp_dtype)


def _run_eval(model, dataset, target_map, name, batch_size, device, amp, workers, progress, amp_dtype) -> dict:
    from tqdm.auto import tqdm

    pin = device.type == "cuda"  # pinned batches: the copies to the GPU overlap the computation
    data = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=pin)
    correct1 = correct5 = seen = 0
    bar = tqdm(data, desc=f"eval {name}", unit="batch", disable=not progress)
    for images, targets in bar:
        targets = target_map[targets].to(device, non_blocking=True)
        with autocast(device, amp, amp_dtype):
            logits = model(images.to(device, non_blocking=True)).float()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += int((top[:, 0] == targets).sum())
        correct5 += int((top == targets[:, None]).any(-1).sum())
        seen += len(targets)
        bar.set_postfix(top1=f"{100 * correct1 / seen:.2f}", top5=f"{100 * correct5 / seen:.2f}")
    if seen == 0:
        raise InputError(f"no images found in {name}")
    return {"top1": 100 * correct1 / seen, "top5": 100 * correct5 / seen, "images": seen}
