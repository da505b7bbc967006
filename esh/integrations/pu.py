"""platonic-universe (``pu``) model adapters for esh's vision models: real Vision Mamba,
MambaVision and ESH-Vision in pu's experiments, on CPU or GPU, with no mamba-ssm build.

Importing this module registers three aliases with ``pu.models.registry.register_adapter``
(pu builds parquet column names ``<alias>_<size>_<mode>`` and splits them on ``_``, so neither
aliases nor sizes contain one):

==============  ==========================================================================
alias           sizes -> esh model
==============  ==========================================================================
``vim``         tiny, small, base (patch 16), tinyplus, smallplus (the stride-8 "+" models)
``mambavision`` t, t2, s, b, l, l2, b21k, l21k
``eshvision``   nano, tiny, small, base
==============  ==========================================================================

Each adapter follows pu's ``ModelAdapter`` contract (``pu.models.base``; the signatures of pu's
current main, which also work where pu 0.1.0 calls them with fewer arguments):
``EshAdapter(model_name, size, alias=None)``, ``load(compile_model=False)``,
``get_preprocessor(modes, resize=False, resize_mode="fill")`` (a per-example callable for
``datasets.Dataset.map``), ``embed_for_mode(batch, mode)`` -> float32 (B, D), ``enable_amp``, and
the layer-wise methods ``supports_layerwise``, ``get_layer_names``, ``get_num_layers``,
``embed_all_layers_for_mode``.

``model_name`` is an esh model name (``vim_tiny``) or a checkpoint file (the authors' released
``.pth``/``.pth.tar``/safetensors or an esh checkpoint; the architecture then comes from
``alias`` and ``size``). Weights: a checkpoint file is loaded as given; a bare model name loads
the released weights through the Hugging Face hub (network needed) unless the adapter was made
with ``pretrained=False`` (random weights, for tests). Preprocessing is each model's own
evaluation transform (Vim: ImageNet mean/std, bicubic resize, centre crop 0.875), not the
0.5/0.5 ViT settings.

pu 0.1.0's package ``__init__`` imports polars, transformers, astropt and OpenCV; when one of
them is missing, this module loads ``pu.models.base`` and ``pu.models.registry`` on their own
(the same module objects that pu uses once its imports succeed) and warns once.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from esh._compat import has_module
from esh.devices import resolve_device
from esh.errors import InputError

__all__ = ["ALIASES", "EshAdapter", "PreprocessEsh", "load_pu_module", "model_map", "register"]

ALIASES: dict[str, dict[str, str]] = {
    "vim": {
        "tiny": "vim_tiny",
        "small": "vim_small",
        "base": "vim_base",
        "tinyplus": "vim_tiny_s8",
        "smallplus": "vim_small_s8",
    },
    "mambavision": {
        "t": "mambavision_t",
        "t2": "mambavision_t2",
        "s": "mambavision_s",
        "b": "mambavision_b",
        "l": "mambavision_l",
        "l2": "mambavision_l2",
        "b21k": "mambavision_b_21k",
        "l21k": "mambavision_l_21k",
    },
    "eshvision": {
        "nano": "esh_vision_nano",
        "tiny": "esh_vision_tiny",
        "small": "esh_vision_small",
        "base": "esh_vision_base",
    },
}

_SPECTRA_MODES = ("desi", "sdss")  # pu modes that carry precomputed embeddings, not images


def load_pu_module(name: str):
    """``pu.<name>`` imported normally, or, when pu's package imports fail for a missing
    dependency, the module file loaded on its own under its real dotted name."""
    if not has_module("pu"):
        raise ImportError(
            "esh.integrations.pu needs platonic-universe: `pip install --no-deps platonic-universe` "
            "(plain `pip install platonic-universe` pulls a CUDA build of torch), "
            'then `pip install "esh[pu]"` for the light dependencies of its registry and metrics'
        )
    dotted = f"pu.{name}"
    try:
        return importlib.import_module(dotted)
    except ImportError as e:
        if dotted in sys.modules:
            return sys.modules[dotted]
        root = importlib.util.find_spec("pu")
        path = Path(next(iter(root.submodule_search_locations)), *name.split("."))
        file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        spec = importlib.util.spec_from_file_location(dotted, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[dotted] = module
        try:
            spec.loader.exec_module(module)
        except Exception:
            del sys.modules[dotted]
            raise
        _warn_partial(e)
        return module


_warned = False


def _warn_partial(error: ImportError) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"platonic-universe's package imports failed ({error}); esh loaded the pu modules it needs on their own. "
            "Adapters and metrics work; pu.experiments needs the missing packages.",
            stacklevel=3,
        )


def model_map(alias: str) -> tuple[list[str], list[str]]:
    """``(sizes, model_names)`` for ``alias`` in the form of pu's experiment ``model_map`` tables."""
    if alias not in ALIASES:
        raise InputError(f"unknown alias {alias!r}; esh registers {sorted(ALIASES)}")
    return list(ALIASES[alias]), list(ALIASES[alias].values())


def _to_pil(value: Any, mode: str, modes: Iterable[str], resize: bool, resize_mode: str):
    """A PIL RGB image from an example's image field: a PIL image, an (H, W[, C]) or (C, H, W)
    array, or a pu flux record (``{"flux": ...}``, converted with pu's own ``flux_to_pil``)."""
    from PIL import Image

    from esh.data.images import to_8bit

    if isinstance(value, Image.Image):
        return to_8bit(value)  # 16-bit and float images scaled, not clipped
    if isinstance(value, dict) and "flux" in value:
        try:
            flux_to_pil = load_pu_module("preprocess").flux_to_pil
        except ImportError as e:
            raise ImportError(
                f"pu flux records need pu.preprocess, which failed to import ({e}); "
                "install pu's imaging dependencies (astropt, opencv-python, scikit-image) or pass images"
            ) from None
        try:  # pu main takes resize_mode, pu 0.1.0 does not
            arr = flux_to_pil(value, mode, list(modes), resize=resize, resize_mode=resize_mode)
        except TypeError:
            arr = flux_to_pil(value, mode, list(modes), resize=resize)
        return Image.fromarray(np.ascontiguousarray(arr))
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise InputError(
            f"mode {mode!r}: expected an image (PIL, (H, W), (H, W, 3) or (3, H, W) array, or a pu flux record); "
            f"got an array of shape {arr.shape}"
        )
    if arr.dtype.kind in "iu" and arr.size and arr.min() >= 0 and arr.max() <= 255:
        arr = arr.astype(np.uint8)  # 8-bit pixels that came back as Python ints (datasets' lists)
    if arr.dtype != np.uint8:  # fluxes or floats: stretched to 0..255 per image
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = np.nan_to_num((arr - lo) / (hi - lo if hi > lo else 1.0)) * 255
        arr = arr.round().astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


class PreprocessEsh:
    """Per-example preprocessing for ``datasets.Dataset.map``: for every image mode, the
    ``<mode>_image`` field (or ``<mode>``) through the model's evaluation transform, stored
    under ``<mode>`` as a (3, H, W) float tensor, as pu's own preprocessors do."""

    def __init__(self, modes: Iterable[str], transform, resize: bool = False, resize_mode: str = "fill"):
        self.modes = list(modes)
        self.transform = transform
        self.resize, self.resize_mode = resize, resize_mode

    def __call__(self, example: dict) -> dict:
        out = {}
        for mode in self.modes:
            if mode in _SPECTRA_MODES:
                continue
            key = f"{mode}_image" if f"{mode}_image" in example else mode
            if key not in example:
                raise InputError(f"example has no {mode}_image (or {mode}) field; fields: {sorted(example)}")
            image = _to_pil(example[key], mode, self.modes, self.resize, self.resize_mode)
            out[mode] = self.transform(image)
        return out


def _adapter_base() -> type:
    return load_pu_module("models.base").ModelAdapter


def _make_adapter_class() -> type:
    base = _adapter_base()

    class EshAdapter(base):
        """pu ``ModelAdapter`` for an esh vision model (see the module docstring)."""

        def __init__(
            self,
            model_name: str,
            size: str,
            alias: str | None = None,
            *,
            checkpoint_path: str | None = None,
            pretrained: bool = True,
            device: str | None = None,
        ):
            super().__init__(model_name, size, alias)
            self._use_amp = False
            self.checkpoint_path = checkpoint_path
            self.pretrained = pretrained
            self.device = resolve_device(device or "auto")  # CUDA when there is one, else the CPU
            self.embedder = None
            self.model = None
            self._n_blocks: int | None = None

        # --- loading ------------------------------------------------------------------
        def _esh_name(self) -> tuple[str, str | None]:
            from esh.models import is_model

            if is_model(self.model_name):
                return self.model_name, self.checkpoint_path
            if Path(self.model_name).is_file():  # a checkpoint: the architecture from alias + size
                sizes = ALIASES.get(self.alias or "", {})
                if self.size not in sizes:
                    raise InputError(
                        f"model_name {self.model_name!r} is a file: alias and size must name the architecture "
                        f"(alias {self.alias!r}: sizes {sorted(sizes) or 'none'}); got size {self.size!r}"
                    )
                return sizes[self.size], self.model_name
            raise InputError(
                f"model_name must be an esh model name (e.g. {', '.join(ALIASES['vim'].values())}) "
                f"or a checkpoint file; got {self.model_name!r}"
            )

        def load(self, compile_model: bool = False) -> None:
            from esh.embed import get_adapter

            name, checkpoint = self._esh_name()
            self.embedder = get_adapter(
                name,
                checkpoint,
                device=str(self.device),
                amp=self._use_amp,
                pretrained=self.pretrained and checkpoint is None,
            )
            self.model = self.embedder.model
            if compile_model:
                self.embedder.model = self.model = torch.compile(self.model)

        def enable_amp(self, enabled: bool = True) -> None:
            """Autocast for inference: bfloat16 on CPU, float16 on CUDA (outputs stay float32)."""
            self._use_amp = enabled
            if self.embedder is not None:
                self.embedder.amp = enabled

        def _loaded(self):
            if self.embedder is None:
                raise RuntimeError("call load() first")
            return self.embedder

        # --- data -----------------------------------------------------------------------
        def get_preprocessor(self, modes: Iterable[str], resize: bool = False, resize_mode: str = "fill"):
            return PreprocessEsh(modes, self._loaded().preprocessor(), resize=resize, resize_mode=resize_mode)

        def _images(self, batch: dict, mode: str) -> Tensor:
            x = batch[mode]
            if not isinstance(x, Tensor):
                x = torch.as_tensor(np.asarray(x))
            if x.dim() == 3:
                x = x.unsqueeze(0)
            return x.float()

        # --- embeddings -----------------------------------------------------------------
        def embed_for_mode(self, batch: dict, mode: str) -> Tensor:
            """float32 (B, D) with the family's pooling (Vim: class token; MambaVision, ESH-Vision:
            pooled features)."""
            return self._loaded().embed(self._images(batch, mode))

        def supports_layerwise(self) -> bool:
            return True

        def _block_names(self, n: int | None = None) -> list[str]:
            """Module names of the blocks whose outputs ``embed_layers`` pools (n of them)."""
            model = self._loaded().model
            if n is None:
                if self._n_blocks is None:  # one forward on a blank image tells how many
                    self._n_blocks = len(self.embedder.embed_layers(self._probe()))
                n = self._n_blocks
            for attr in ("layers", "levels", "stages", "blocks"):
                mods = getattr(model, attr, None)
                if mods is not None and hasattr(mods, "__len__") and len(mods) == n:
                    return [f"{attr}.{i}" for i in range(n)]
            return [f"blocks.{i}" for i in range(n)]

        def _probe(self) -> Tensor:
            size = self.embedder.model.pretrained_cfg.get("input_size", (3, 224, 224))
            return torch.zeros(1, *size)

        def get_layer_names(self, granularity: str = "blocks") -> list[str]:
            if granularity == "blocks":
                return [*self._block_names(), "last_hidden_state"]
            if not hasattr(base, "_capture_module_outputs"):
                raise InputError(f"granularity {granularity!r} needs pu's current main (pu 0.1.0 has blocks only)")
            return super().get_layer_names(granularity=granularity)

        def get_num_layers(self, granularity: str = "blocks") -> int:
            return len(self.get_layer_names(granularity))

        def _get_hookable_model(self):
            return self._loaded().model

        def embed_all_layers_for_mode(self, batch: dict, mode: str, granularity: str = "blocks") -> dict[str, Tensor]:
            """Per block (``granularity="blocks"``): the family's pooling of each block's output,
            keyed by module name, plus ``last_hidden_state`` = ``embed_for_mode``. Other
            granularities use pu's module hooks with its generic pooling."""
            x = self._images(batch, mode)
            if granularity != "blocks":
                if not hasattr(base, "_capture_module_outputs"):
                    raise InputError(f"granularity {granularity!r} needs pu's current main (pu 0.1.0 has blocks only)")
                embedder = self._loaded()

                def forward() -> None:
                    with embedder._context():
                        embedder.model.forward_features(x.to(embedder.device))

                return self._capture_module_outputs(forward, model=embedder.model, granularity=granularity)
            layers = self._loaded().embed_layers(x)
            out = dict(zip(self._block_names(len(layers)), layers))
            out["last_hidden_state"] = self.embedder.embed(x)
            return out

    return EshAdapter


def register() -> type:
    """Register ``vim``, ``mambavision`` and ``eshvision`` with pu; returns the adapter class."""
    registry = load_pu_module("models.registry")
    for alias in ALIASES:
        registry.register_adapter(alias, EshAdapter)
    return EshAdapter


EshAdapter = _make_adapter_class()
register()
