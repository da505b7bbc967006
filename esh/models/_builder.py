"""Building a registered vision model: timm's ``build_model_with_cfg`` with esh's weight loading.

timm's builder resolves the registered ``pretrained_cfg`` and attaches it, fills ``num_classes``
and ``in_chans`` from it, and wraps ``features_only`` models in a feature extractor. Its weight
loader is not used: it drops a classifier of another size and loads the rest non-strictly,
where esh names every key and shape that does not fit, and some architecture follows from the
file (Vim's stride, from the length of its pos_embed), which needs the checkpoint before the
model exists. So esh reads the checkpoint inside the constructor it hands to timm, before any
feature wrapper exists, and timm is always told ``pretrained=False``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from esh._compat import import_timm
from esh.errors import InputError
from esh.models._checkpoint import download_weights

_timm = import_timm()
FeatureGetterNet = _timm.models._features.FeatureGetterNet


def build_model(
    model_cls: Callable[..., nn.Module],
    variant: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    *,
    load_checkpoint: Callable[[nn.Module, str], None],
    checkpoint_args: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None,
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
        checkpoint_path: a local file to load with ``load_checkpoint(model, path)``.
        checkpoint_args: model arguments that the checkpoint decides, as
            ``checkpoint_args(path, model_kwargs) -> model_kwargs`` (Vim: its stride).
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

    def construct(**model_kwargs: Any) -> nn.Module:
        if checkpoint_path is not None and checkpoint_args is not None:
            model_kwargs = checkpoint_args(str(checkpoint_path), model_kwargs)
        model = model_cls(**model_kwargs)
        if checkpoint_path is not None:
            load_checkpoint(model, str(checkpoint_path))
        return model

    return _timm.models.build_model_with_cfg(
        construct, variant, pretrained=False, pretrained_cfg=cfg, feature_cfg=feature_cfg, **kwargs
    )
