"""Export to ONNX or TorchScript, verified against eager PyTorch before the file is put in place.

The selective scan is exported as its reference loop (exp, multiply, add, sum: operators
every runtime has), unrolled over the sequence, so no custom operator is needed; the file is
then run (onnxruntime for ONNX, ``torch.jit.load`` for TorchScript) on a fresh random batch
and compared with the eager model on esh's fast path.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from esh._io import atomic_path
from esh.errors import EshError, InputError, is_whole, require
from esh.ops.selective_scan import use_backend

FORMATS = ("onnx", "torchscript")


class ExportError(EshError, RuntimeError):
    """The exported file does not reproduce the eager model."""


@dataclass
class ExportResult:
    path: Path
    format: str
    input_shape: tuple[int, ...]
    max_rel_diff: float


def _input_shape(model: nn.Module, img_size: int | None, batch_size: int) -> tuple[int, int, int, int]:
    c, h, w = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
    if img_size is not None:
        h = w = img_size
    return (batch_size, c, h, w)


def export_model(
    model: nn.Module,
    out: str | os.PathLike,
    format: str = "onnx",
    img_size: int | None = None,
    batch_size: int = 1,
    opset: int = 17,
    tolerance: float = 1e-4,
) -> ExportResult:
    """Write ``model`` to ``out`` and check it: max |Δ| / max |eager| ≤ tolerance. The file is
    checked before it replaces ``out`` (a failed export or check leaves the previous file)."""
    if format not in FORMATS:
        raise InputError(f"export format must be one of {FORMATS}; got {format!r}")
    for key, value in (("img_size", img_size), ("batch_size", batch_size)):
        if value is not None and not is_whole(value, 1):
            raise InputError(f"{key} must be a positive integer; got {value!r}")
    if format == "onnx":  # before any work: a missing package is one line naming the install
        require("onnx", "onnx", "ONNX export")
        require("onnxruntime", "onnx", "Checking an ONNX export")
        blocker = _onnx_blocker(model)
        if blocker is not None:
            name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
            raise ExportError(f"{name} cannot be exported to ONNX: {blocker}; use --format torchscript")
    out = Path(out)
    model = model.eval()
    shape = _input_shape(model, img_size, batch_size)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    check = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with atomic_path(out) as tmp:
        _write(model, example, tmp, format, opset)
        with torch.no_grad():
            expected = model(check)
            got = _run_exported(tmp, format, check)
        rel = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
        if not rel <= tolerance:
            raise ExportError(
                f"the {format} export differs from the eager model: max relative difference {rel:.2e} > "
                f"{tolerance:.0e}; {out} was not written"
            )
    return ExportResult(out, format, shape, rel)


def _write(model: nn.Module, example: torch.Tensor, path: Path, format: str, opset: int) -> None:
    with torch.no_grad(), use_backend("reference"), warnings.catch_warnings():
        # shape checks become constants in the traced graph: intended, the input size is fixed
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")
        if format == "torchscript":
            torch.jit.trace(model, example, check_trace=False).save(str(path))
            return
        try:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                input_names=["images"],
                output_names=["logits"],
                opset_version=opset,
                dynamo=False,
            )
        except torch.onnx.errors.UnsupportedOperatorError as e:
            name = type(model).__name__
            raise ExportError(f"{name} cannot be exported to ONNX opset {opset}: {' '.join(str(e).split())}") from e


def _onnx_blocker(model: nn.Module) -> str | None:
    """Why ``model`` cannot become an ONNX graph, found before any tracing; None when it can."""
    from esh.layers.act import AdaptiveComputationTime

    for name, module in model.named_modules():
        if isinstance(module, AdaptiveComputationTime) and module.max_steps > 1:
            return (
                f"its adaptive computation ({name}) attends to a different subset of patches for each image "
                "(aten::unique_consecutive), which an ONNX graph of fixed shapes cannot express"
            )
    return None


def _run_exported(path: Path, format: str, x: torch.Tensor) -> torch.Tensor:
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")
            return torch.jit.load(str(path))(x)
    ort = require("onnxruntime", "onnx", "Checking an ONNX export")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
