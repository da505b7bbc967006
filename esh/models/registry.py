"""One registry of model builders: ``create_model``, ``list_models``, ``register_model``.

A builder is a function ``fn(pretrained=False, checkpoint_path=None, **kwargs) -> nn.Module``
named after the model it builds. It loads the weights itself, because the right key mapping
(and for some families the architecture: Vim's stride, say) depends on the checkpoint.
Builders registered with ``timm=True`` are also registered with timm when timm imports, so
``timm.create_model(name)`` builds the same network; timm takes the model's pretrained cfg from
the ``default_cfgs`` of the builder's module at that moment, so a model file defines
``default_cfgs`` above its builders, as timm's own model files do.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from esh.errors import InputError

_builders: dict[str, Callable[..., nn.Module]] = {}
_timm_names: set[str] = set()


class UnknownModelError(InputError):
    """``create_model`` was given a name that no builder is registered under."""


def register_model(fn: Callable[..., nn.Module] | None = None, *, timm: bool = False):
    """Register a builder under its function name; ``@register_model`` or ``@register_model(timm=True)``."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _builders and _builders[name] is not builder:
            raise InputError(f"a model named {name!r} is already registered (by {_builders[name].__module__})")
        _builders[name] = builder
        if timm:
            _register_with_timm(builder)
        return builder

    return decorate(fn) if fn is not None else decorate


def _register_with_timm(builder: Callable[..., nn.Module]) -> None:
    """Expose the builder to ``timm.create_model`` (a no-op when timm is not installed)."""
    from esh._compat import has_module, import_timm

    if not has_module("timm"):
        return
    timm_registry = import_timm().models._registry

    @functools.wraps(builder)
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        # timm.create_model always passes pretrained_cfg, pretrained_cfg_overlay and cache_dir;
        # a builder sees them only when they were set (builders without a cfg need not take them)
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            if kwargs.get(key, "") is None:
                del kwargs[key]
        return builder(pretrained=pretrained, **kwargs)

    if builder.__name__ not in timm_registry._model_entrypoints:
        timm_registry.register_model(entrypoint)
    _timm_names.add(builder.__name__)


def _unregister(name: str) -> None:
    """Remove a builder (tests only)."""
    _builders.pop(name, None)
    if name in _timm_names:
        _timm_names.discard(name)
        from esh._compat import import_timm

        reg = import_timm().models._registry
        reg._clear_model_entries(name)
        reg._model_entrypoints.pop(name, None)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` is a shell-style wildcard (``"mambavision*"``)."""
    names = sorted(_builders)
    if pattern:
        names = [
            n for n in names if fnmatch.fnmatchcase(n, pattern if any(c in pattern for c in "*?[") else f"*{pattern}*")
        ]
    return names


def is_model(name: str) -> bool:
    return name in _builders


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from ``list_models()``.
        pretrained: download the released weights (through huggingface_hub, cached).
        checkpoint_path: a local checkpoint to load: the authors' released file unchanged,
            or one written by esh. For the vision models, a checkpoint whose classifier has
            another number of classes than ``num_classes`` loads everything but that classifier
            (fine-tuning starts a new head, with a ``ClassifierNote`` warning).
        **kwargs: architecture overrides, e.g. ``num_classes=10`` or ``img_size=384``; for the
            vision models also ``ignore_classifier=True`` (load no classifier weights) and
            timm's ``features_only``/``out_indices``.
    """
    builder = _builders.get(name)
    if builder is None:
        close = difflib.get_close_matches(name, _builders, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}{hint} ({len(_builders)} models are registered: see esh.list_models())"
        )
    return builder(pretrained=pretrained, checkpoint_path=checkpoint_path, **kwargs)
