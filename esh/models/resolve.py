"""One way from a model name (and weights) to a network: an esh name, else a timm name.

Every command that builds an image model goes through :func:`build_model`, or through
:func:`resolve_model` when it also wants what an ``esh train`` checkpoint records about the
model it holds: the architecture, the number of classes and their names, the input size the
model was trained at and its builder arguments. With those, ``esh predict``/``eval``/
``export``/``saliency`` run a training checkpoint without being told its model or its head.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from esh.errors import InputError, is_whole

__all__ = ["CheckpointInfo", "ResolvedModel", "build_model", "checkpoint_info", "resolve_model"]


@dataclass
class CheckpointInfo:
    """What an ``esh train`` checkpoint records about its model; all None/empty for other files."""

    arch: str | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    img_size: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ResolvedModel:
    """A built model and what a command needs to run it as it was trained.

    ``img_size``: the input size to preprocess to (the one asked for, else the checkpoint's
    training size, else None for the model's own); ``crop_pct``: the evaluation crop (1.0 for
    an ``esh train`` checkpoint, whose validation resized the whole image; None: the model's);
    ``weights``: a short description of the weights (a file name, "released (pretrained)"),
    None for untrained ones."""

    model: nn.Module
    name: str
    class_names: list[str] | None
    img_size: int | None
    crop_pct: float | None
    weights: str | None
    info: CheckpointInfo


def _positive(value: Any) -> int | None:
    return value if is_whole(value, 1) else None


def checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Read what an ``esh train`` checkpoint records (``arch``, ``num_classes``, ``classes``,
    ``config.img_size``, ``config.model_kwargs``); fields of the wrong type count as absent."""
    from esh.models._checkpoint import read_checkpoint

    return info_of_checkpoint(read_checkpoint(path))


def info_of_checkpoint(ckpt: Mapping) -> CheckpointInfo:
    """What an ``esh train`` checkpoint already read records (see :func:`checkpoint_info`)."""
    config = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else {}
    classes = ckpt.get("classes")
    names = [str(c) for c in classes] if isinstance(classes, (list, tuple)) and classes else None
    kwargs = config.get("model_kwargs")
    return CheckpointInfo(
        arch=ckpt.get("arch") if isinstance(ckpt.get("arch"), str) and ckpt.get("arch") else None,
        num_classes=_positive(ckpt.get("num_classes")),
        class_names=names,
        img_size=_positive(config.get("img_size")),
        model_kwargs=dict(kwargs) if isinstance(kwargs, Mapping) else {},
    )


def _timm_model(name: str, pretrained: bool, kwargs: dict[str, Any], img_size: int | None) -> nn.Module:
    from esh._compat import import_timm

    timm = import_timm()
    if not timm.is_model(name):
        raise InputError(
            f"unknown model {name!r}: neither an esh model (esh models) nor a timm model (timm.list_models())"
        )
    if img_size is not None:
        try:  # models with position embeddings are built for the size; the others take no img_size
            return timm.create_model(name, pretrained=pretrained, img_size=img_size, **kwargs)
        except TypeError:
            pass
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise InputError(f"timm's {name} does not take a model argument you gave ({e})") from None


def build_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """An esh model by name (``esh.create_model``), else any timm model (``timm.create_model``),
    with ``num_classes`` (0: no classifier, for features) and ``img_size`` when given (a timm
    model without position embeddings ignores ``img_size``). A checkpoint for a timm model is
    read with esh's safe loader."""
    from esh.models import create_model, is_model

    if img_size is not None and not is_whole(img_size, 1):
        raise InputError(f"img_size must be a positive integer; got {img_size!r}")
    if num_classes is not None and not is_whole(num_classes, 0):
        raise InputError(f"num_classes must be an integer >= 0 (0: no classifier); got {num_classes!r}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if is_model(name):
        if img_size is not None:
            kwargs["img_size"] = img_size
        path = None if checkpoint_path is None else str(checkpoint_path)
        return create_model(name, pretrained=pretrained and path is None, checkpoint_path=path, **kwargs)
    model = _timm_model(name, pretrained and checkpoint_path is None, kwargs, img_size)
    if checkpoint_path is not None:  # esh's safe reader (timm's own loader unpickles freely)
        from esh.models._builder import load_checkpoint

        load_checkpoint(model, checkpoint_path, what=name)
    return model


def resolve_model(
    name: str | None = None,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    img_size: int | None = None,
    **kwargs: Any,
) -> ResolvedModel:
    """Build the model a command was asked for. An ``esh train`` checkpoint supplies the model
    name (when ``name`` is None), its number of classes, class names, builder arguments and
    training input size; the arguments given here win over what the checkpoint records, except
    the model name, which must agree."""
    info = CheckpointInfo()
    if checkpoint_path is not None:
        info = checkpoint_info(checkpoint_path)
    if name is None:
        name = info.arch
    if name is None:
        raise InputError(
            "name the model (--model NAME): "
            + ("the checkpoint does not record one" if checkpoint_path is not None else "no checkpoint was given")
        )
    if info.arch is not None and info.arch != name:
        raise InputError(f"{checkpoint_path} holds a {info.arch} trained by esh train, not a {name}")
    if num_classes is None:
        num_classes = info.num_classes
    size = img_size or info.img_size
    model = build_model(
        name,
        pretrained=pretrained,
        checkpoint_path=checkpoint_path,
        num_classes=num_classes,
        img_size=size,
        **{**info.model_kwargs, **kwargs},
    )
    class_names = info.class_names
    outputs = getattr(model, "num_classes", None)
    if class_names is not None and outputs is not None and len(class_names) != outputs:
        class_names = None  # a new head (another --num-classes): the recorded names do not apply
    if checkpoint_path is not None:
        weights = Path(checkpoint_path).name
    elif pretrained:
        weights = "released (pretrained)"
    else:
        weights = None
    crop_pct = 1.0 if info.arch is not None else None
    return ResolvedModel(model, name, class_names, size, crop_pct, weights, info)
