"""Embedding adapters: one (B, D) vector per image, and one per block, for any esh vision
model and any timm model, each with the family's proper pooling and its own preprocessing.

* Vim: the class token (its final state after ``norm_f``; per block, the residual stream's
  class-token entry).
* MambaVision: the pooled features (average of the final BatchNorm-ed map; per stage, the
  average of each stage map).
* ESH-Vision: the pooled features, like MambaVision; per intermediate, the spatial average.
* timm ViT-like models: the CLS token when the model has one (``global_pool="token"``),
  otherwise the mean of the patch tokens; per block, the mean of the block's patch tokens.
* other timm models (CNNs): ``forward_head(pre_logits=True)``; per stage, spatial means.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from esh.devices import resolve_device
from esh.errors import InputError
from esh.train.precision import autocast, enable_tf32

__all__ = ["EmbeddingAdapter", "get_adapter", "load_backbone", "weights_digest"]


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _recorded_build_args(raw: Mapping, name: str, path) -> dict:
    """The builder arguments an ``esh train`` checkpoint records (its ``model_kwargs`` and
    input size), after checking that it holds the model asked for."""
    from esh.models.resolve import info_of_checkpoint

    info = info_of_checkpoint(raw)
    if info.arch is not None and info.arch != name:
        raise InputError(f"{path} holds a {info.arch} trained by esh train, not a {name}")
    kwargs = {k: v for k, v in info.model_kwargs.items() if k != "num_classes"}
    if info.img_size is not None:
        kwargs["img_size"] = info.img_size
    return kwargs


def load_backbone(model: nn.Module, checkpoint: str | os.PathLike | Mapping, name: str) -> None:
    """Load a checkpoint's weights (a file, or the dict read from one) into ``model`` (built
    with ``num_classes=0``), leaving out the checkpoint's classifier
    (``pretrained_cfg["classifier"]``, e.g. ``head.weight`` and ``head.bias``); every other key
    must fit. Released files go through the family's ``checkpoint_filter_fn``; files for timm
    models are read with esh's safe loader."""
    from esh.models._builder import load_checkpoint

    load_checkpoint(model, checkpoint, ignore_classifier=True, what=name)


class EmbeddingAdapter:
    """Load a model, preprocess images its way, embed batches."""

    pooling = "forward_head(pre_logits=True)"

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        amp: bool = False,
        amp_dtype: str | None = None,
        name: str | None = None,
    ):
        """``amp``: autocast to ``amp_dtype`` (default: bfloat16 on CPU and on GPUs that have
        it, else float16); embeddings come out in float32 either way."""
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.name = name or type(model).__name__
        self.amp, self.amp_dtype = amp, amp_dtype
        enable_tf32(self.device)

    @classmethod
    def load(
        cls, name: str, checkpoint_path: str | os.PathLike | None = None, pretrained: bool = False, **kwargs
    ) -> EmbeddingAdapter:
        """The model ``name`` without its classifier. ``checkpoint_path``: a released checkpoint
        or one from ``esh train`` (its recorded builder arguments and input size are used); the
        checkpoint's classifier is ignored. Untrained weights are seeded (seed 0), so the same
        name always gives the same model."""
        from esh.models._checkpoint import read_checkpoint
        from esh.models.resolve import build_model

        raw = None if checkpoint_path is None else read_checkpoint(checkpoint_path)
        build_kwargs = {} if raw is None else _recorded_build_args(raw, name, checkpoint_path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_model(name, pretrained=pretrained and raw is None, num_classes=0, **build_kwargs)
        if raw is not None:
            load_backbone(model, raw, name)
        return cls(model, name=name, **kwargs)

    def fingerprint(self) -> dict[str, str]:
        """What determines this adapter's embeddings: the model, a digest of its weights, the
        pooling, the preprocessing and the autocast dtype."""
        return {
            "adapter": type(self).__name__,
            "model": self.name,
            "weights": weights_digest(self.model),
            "pooling": str(self.pooling),
            "preprocessing": repr(self.preprocessor()),
            "dtype": f"autocast {self.amp_dtype or 'default'}" if self.amp else "float32",
            "device": self.device.type,
        }

    def preprocessor(self) -> Callable:
        """The model's evaluation transform (PIL image -> tensor)."""
        from esh.inference import eval_transform

        return eval_transform(self.model)

    def _context(self):
        return autocast(self.device, self.amp, self.amp_dtype)

    @torch.inference_mode()
    def embed(self, batch: Tensor) -> Tensor:
        """(B, C, H, W) preprocessed images -> float32 (B, D)."""
        with self._context():
            return self._pool(self.model.forward_features(batch.to(self.device))).float()

    @torch.inference_mode()
    def embed_layers(self, batch: Tensor) -> list[Tensor]:
        """One float32 (B, D_l) per block (or stage), in depth order."""
        with self._context():
            feats = self.model.forward_intermediates(batch.to(self.device), intermediates_only=True)
        return [self._pool_layer(f).float() for f in feats]

    def _pool(self, features: Tensor) -> Tensor:
        return self.model.forward_head(features, pre_logits=True)

    def _pool_layer(self, f: Tensor) -> Tensor:
        return f.mean(dim=(2, 3)) if f.dim() == 4 else f.mean(dim=1)


class VimAdapter(EmbeddingAdapter):
    pooling = "class token (middle of the sequence)"

    @torch.inference_mode()
    def embed_layers(self, batch: Tensor) -> list[Tensor]:
        m = self.model
        with self._context():
            _, taken = m._blocks(m._embed(batch.to(self.device)), range(len(m.layers)))
        return [t[:, m.token_position].float() for t in taken]


class MambaVisionAdapter(EmbeddingAdapter):
    pooling = "average of the final normalised map; per stage, the average of each stage map"


class ESHVisionAdapter(EmbeddingAdapter):
    pooling = "average of the final normalised map; per block or stage, the average of its map"


class TimmTokenAdapter(EmbeddingAdapter):
    """ViT-like timm models (tokens out of forward_features)."""

    @property
    def pooling(self) -> str:  # type: ignore[override]
        return "CLS token" if self._uses_cls else "mean of patch tokens"

    @property
    def _uses_cls(self) -> bool:
        return getattr(self.model, "global_pool", "") == "token" and getattr(self.model, "num_prefix_tokens", 0) > 0

    def _pool(self, tokens: Tensor) -> Tensor:
        return self.model.forward_head(tokens, pre_logits=True) if tokens.dim() == 3 else super()._pool(tokens)

    @torch.inference_mode()
    def embed_layers(self, batch: Tensor) -> list[Tensor]:
        with self._context():
            feats = self.model.forward_intermediates(
                batch.to(self.device), intermediates_only=True, output_fmt="NLC", return_prefix_tokens=False
            )
        # only patch tokens come back per block: their mean, whatever the final pooling
        return [f.mean(dim=1).float() for f in feats]


def get_adapter(
    name: str,
    checkpoint_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    amp: bool = False,
    pretrained: bool = False,
    amp_dtype: str | None = None,
) -> EmbeddingAdapter:
    """The adapter for a model name: esh's families by prefix, timm's models by their kind.

    ``checkpoint_path``: released or ``esh train`` weights; the classifier in it is ignored.
    ``pretrained=True`` downloads the released weights (esh: the hub, network needed); without
    either, the weights are untrained and seeded."""
    device = resolve_device(device)  # a bad --device is refused before the model is built
    if name.startswith("vim"):
        cls: type[EmbeddingAdapter] = VimAdapter
    elif name.startswith("mambavision"):
        cls = MambaVisionAdapter
    elif name.startswith("esh_vision"):
        cls = ESHVisionAdapter
    elif any(k in name for k in ("vit", "deit", "eva", "beit")):
        cls = TimmTokenAdapter
    else:
        cls = EmbeddingAdapter
    return cls.load(name, checkpoint_path, pretrained=pretrained, device=device, amp=amp, amp_dtype=amp_dtype)
