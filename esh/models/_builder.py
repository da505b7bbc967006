"""Building a registered vision model: timm's ``build_model_with_cfg`` with esh's weight loading,
and the pieces every vision family shares (stochastic-depth rates, block checkpointing).

timm's builder resolves the registered ``pretrained_cfg`` and attaches it, fills ``num_classes``
and ``in_chans`` from it, and wraps ``features_only`` models in a feature extractor. Its weight
loader is not used: it loads non-strictly, where esh names every key, shape and dtype that does
not fit, and some architecture follows from the file (Vim's stride, from the length of its
pos_embed), which needs the checkpoint before the model exists. So esh reads the checkpoint
once, before the model is built, loads it inside the constructor it hands to timm (before any
feature wrapper exists), and timm is always told ``pretrained=False``. As timm's loader does, a
checkpoint whose classifier has another number of classes loads its backbone and the model
keeps its new head (``load_into``).
"""

from __future__ import annotations

import difflib
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from esh._compat import import_timm
from esh.errors import InputError, is_whole
from esh.models._checkpoint import (
    CheckpointError,
    download_weights,
    extract_state_dict,
    load_into,
    read_checkpoint,
    strip_prefix,
)

_timm = import_timm()
FeatureGetterNet = _timm.models._features.FeatureGetterNet


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Stochastic-depth rates rising linearly from 0 to ``drop_path_rate`` over all blocks,
    split per stage: ``drop_path_rates(0.2, (1, 2))`` -> ``[[0.0], [0.1, 0.2]]``."""
    rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [rates[s : s + d] for s, d in zip(starts, depths, strict=True)]


def call_block(block: Callable[..., Any], *args: Any, checkpointing: bool = False) -> Any:
    """``block(*args)``, under activation checkpointing when ``checkpointing`` is on and a
    gradient is being recorded (the recomputation is pointless otherwise)."""
    if checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def vision_cfg(**kwargs: Any) -> dict[str, Any]:
    """The pretrained-cfg fields every esh vision family starts from (1000 classes at 224²,
    bicubic centre crop, ImageNet mean/std, classifier ``head``); a family's ``_cfg`` adds or
    overrides the rest."""
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "classifier": "head",
        **kwargs,
    }


_TIMM_ONLY_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "scriptable", "exportable", "no_jit")


class UnexpectedArgumentError(InputError, TypeError):
    """A model argument that the family does not take (a TypeError too, as Python's own)."""


def check_model_args(family: str, kwargs: dict[str, Any], accepted: Iterable[str] | None = None) -> None:
    """One-line InputErrors for the arguments every vision family shares (a positive
    ``img_size`` and ``in_chans``, ``num_classes`` >= 0, rates in [0, 1)) and, with
    ``accepted``, for names the family does not take (naming the close matches)."""
    if accepted is not None:
        accepted = set(accepted)
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, accepted, n=3)
                hints.append(f"{name} (did you mean {', '.join(close)}?)" if close else name)
            raise UnexpectedArgumentError(
                f"{family} got unexpected arguments {', '.join(hints)}; it takes {', '.join(sorted(accepted))}"
            )

    if "img_size" in kwargs:
        size = kwargs["img_size"]
        sides = [size] if not isinstance(size, (tuple, list)) else list(size)
        if len(sides) not in (1, 2) or not all(is_whole(v, 1) for v in sides):
            raise InputError(f"img_size must be a positive int or (height, width) of positive ints; got {size!r}")
    for name, low in (("num_classes", 0), ("in_chans", 1)):
        if name in kwargs and not is_whole(kwargs[name], low):
            raise InputError(f"{name} must be an int >= {low}; got {kwargs[name]!r}")
    for name in ("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate"):
        v = kwargs.get(name)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1):
            raise InputError(f"{name} must be a number in [0, 1); got {v!r}")


def _accepted_args(model_cls: Callable[..., nn.Module]) -> set[str] | None:
    """The keyword arguments a model class takes: its ``accepted_args()`` when it defines one,
    else its signature's names (None when it takes ``**kwargs`` it does not declare)."""
    if hasattr(model_cls, "accepted_args"):
        return set(model_cls.accepted_args())
    params = inspect.signature(model_cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def build_model(
    model_cls: Callable[..., nn.Module],
    variant: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    *,
    checkpoint_filter_fn: Callable[[dict, nn.Module], dict[str, Tensor]],
    checkpoint_args: Callable[[dict, dict[str, Any]], dict[str, Any]] | None = None,
    load_hint: Callable[[dict[str, Tensor]], str] | None = None,
    ignore_classifier: bool = False,
    feature_cfg: dict[str, Any] | None = None,
    official_filename: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``variant`` with its registered pretrained cfg, load weights, wrap for features.

    Args:
        model_cls: the network class (called with the model keyword arguments).
        variant: the registered name; its ``default_cfgs`` entry is the pretrained cfg.
        pretrained: download the released weights (``hf_hub_id``/``hf_hub_filename`` of the
            cfg, or its ``file``) when no ``checkpoint_path`` is given.
        checkpoint_path: a local file; it is read once (``read_checkpoint``) and mapped onto the
            model's keys with ``checkpoint_filter_fn(checkpoint, model)``.
        checkpoint_args: model arguments that the checkpoint decides, as
            ``checkpoint_args(checkpoint, model_kwargs) -> model_kwargs`` (Vim: its stride).
        load_hint: a sentence added to a load error, from the mapped state dict (MambaVision:
            which released variant the file looks like).
        ignore_classifier: load everything but the checkpoint's classifier, whatever its
            shape (an embedding model ignores the head); otherwise a classifier of another
            number of classes is replaced by the model's new head, with a note.
        feature_cfg: the family's feature-extractor settings; ``features_only=True`` wraps the
            model in timm's ``FeatureGetterNet`` (features from ``forward_intermediates``).
        official_filename: the authors' own training file, named in the offline error.
        **kwargs: model arguments, and timm's ``features_only``/``out_indices``/``feature_cls``.
    """
    feature_cfg = {"feature_cls": "getter", **(feature_cfg or {}), **(kwargs.pop("feature_cfg", None) or {})}
    if "feature_cls" in kwargs:
        feature_cfg["feature_cls"] = kwargs.pop("feature_cls")
    feature_cls = feature_cfg["feature_cls"]
    if feature_cls != "getter" and not (isinstance(feature_cls, type) and issubclass(feature_cls, FeatureGetterNet)):
        # the others hook module outputs: MambaVision's stages downsample before returning
        # and Vim's blocks return (hidden, residual), so those maps would not be the features
        raise InputError(
            f"feature_cls must be 'getter' for {variant} (its features come from forward_intermediates); "
            f"got {feature_cls!r}"
        )
    check_model_args(variant, kwargs)
    overlay = dict(pretrained_cfg_overlay or {})
    cfg = _timm.models.resolve_pretrained_cfg(variant, pretrained_cfg, overlay)
    if "img_size" in kwargs or "in_chans" in kwargs:
        # pretrained_cfg["input_size"] is what esh evaluates, exports and counts at: the
        # size this model was built for, not the checkpoint's
        size = kwargs.get("img_size", cfg.input_size[1:])
        size = (size, size) if isinstance(size, int) else tuple(size)
        overlay["input_size"] = (kwargs.get("in_chans", cfg.input_size[0]), *size)
        cfg = _timm.models.resolve_pretrained_cfg(variant, pretrained_cfg, overlay)

    if pretrained and checkpoint_path is None:
        checkpoint_path = cfg.file or download_weights(
            {**cfg.to_dict(), "official_filename": official_filename}, variant, cache_dir
        )
    checkpoint = read_checkpoint(checkpoint_path) if checkpoint_path is not None else None

    def construct(**model_kwargs: Any) -> nn.Module:
        for name in _TIMM_ONLY_ARGS:  # timm's settings, not the network's
            model_kwargs.pop(name, None)
        check_model_args(variant, model_kwargs, _accepted_args(model_cls))
        if checkpoint is not None and checkpoint_args is not None:
            model_kwargs = checkpoint_args(checkpoint, model_kwargs)
        model = model_cls(**model_kwargs)
        if checkpoint is not None:
            _load(model, checkpoint, checkpoint_filter_fn, variant, cfg.classifier, ignore_classifier, load_hint)
        return model

    return _timm.models.build_model_with_cfg(
        construct, variant, pretrained=False, pretrained_cfg=cfg, feature_cfg=feature_cfg, **kwargs
    )


def _load(
    model: nn.Module,
    checkpoint: dict,
    filter_fn: Callable[[dict, nn.Module], dict[str, Tensor]] | None,
    what: str,
    classifier: str | Sequence[str] | None,
    ignore_classifier: bool,
    load_hint: Callable[[dict[str, Tensor]], str] | None,
) -> None:
    if filter_fn is not None:
        state = filter_fn(checkpoint, model)
    else:
        state = strip_prefix(strip_prefix(extract_state_dict(checkpoint), "module."), "_orig_mod.")
    try:
        load_into(model, state, what, classifier=classifier, ignore_classifier=ignore_classifier)
    except CheckpointError as e:
        hint = load_hint(state) if load_hint is not None else ""
        if not hint:
            raise
        raise CheckpointError(f"{e}. {hint}") from None


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping,
    *,
    ignore_classifier: bool = False,
    what: str | None = None,
    load_hint: Callable[[dict[str, Tensor]], str] | None = None,
    filter_fn: Callable[[dict, nn.Module], dict[str, Tensor]] | None = None,
) -> nn.Module:
    """Load a checkpoint (a file, or the dict already read from one) into a built model
    (returns the model).

    An esh model's file is mapped by the ``checkpoint_filter_fn`` of its family (the authors'
    files and esh's own alike); any other model's (timm's) is read as a state dict, with
    ``module.`` / ``_orig_mod.`` prefixes removed. ``ignore_classifier=True`` loads everything
    but the classifier (``pretrained_cfg["classifier"]``), whatever its shape: what an embedding
    adapter or a fine-tuning script wants. Without it, a classifier of another number of
    classes is dropped with a note and every other key must fit. Failures are one-line
    ``CheckpointError``s. ``filter_fn`` replaces the family's mapping; ``load_hint`` adds a
    sentence to a load error (see ``build_model``).
    """
    family = type(model).__module__
    if filter_fn is None and family.startswith("esh."):
        filter_fn = getattr(sys.modules.get(family), "checkpoint_filter_fn", None)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier", "head") if isinstance(cfg, dict) else getattr(cfg, "classifier", "head")
    what = what or type(model).__name__
    raw = dict(checkpoint) if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)
    _load(model, raw, filter_fn, what, classifier, ignore_classifier, load_hint)
    return model
