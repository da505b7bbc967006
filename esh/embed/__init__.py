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

from collections.abc import Callable

import torch
from torch import Tensor, nn

from esh._compat import import_timm
from esh.train.precision import autocast, enable_tf32

__all__ = ["EmbeddingAdapter", "get_adapter"]


class EmbeddingAdapter:
    """Load a model, preprocess images its way, embed batches."""

    pooling = "forward_head(pre_logits=True)"

    def __init__(
        self, model: nn.Module, device: str | torch.device = "cpu", amp: bool = False, amp_dtype: str | None = None
    ):
        """``amp``: autocast to ``amp_dtype`` (default: bfloat16 on CPU and on GPUs that have
        it, else float16); embeddings come out in float32 either way."""
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.amp, self.amp_dtype = amp, amp_dtype
        enable_tf32(self.device)

    @classmethod
    def load(
        cls, name: str, checkpoint_path: str | None = None, pretrained: bool = False, **kwargs
    ) -> EmbeddingAdapter:
        from esh.models import create_model, is_model

        if is_model(name):
            model = create_model(name, pretrained=pretrained, checkpoint_path=checkpoint_path, num_classes=0)
        else:
            model = import_timm().create_model(
                name, pretrained=pretrained, num_classes=0, checkpoint_path=checkpoint_path or ""
            )
        return cls(model, **kwargs)

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
    checkpoint_path: str | None = None,
    device: str = "cpu",
    amp: bool = False,
    pretrained: bool = False,
    amp_dtype: str | None = None,
) -> EmbeddingAdapter:
    """The adapter for a model name: esh's families by prefix, timm's models by their kind.

    ``pretrained=True`` downloads the released weights (esh: the hub, network needed)."""
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
