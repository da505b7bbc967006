"""Export to ONNX or TorchScript, verified against eager PyTorch after writing.

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

from esh._compat import require
from esh.errors import EshError, InputError
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
    """Write ``model`` to ``out`` (atomically) and check it: max |Δ| / max |eager| ≤ tolerance."""
    if format not in FORMATS:
        raise InputError(f"export format must be one of {FORMATS}; got {format!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    model = model.eval()
    shape = _input_shape(model, img_size, batch_size)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad(), use_backend("reference"), warnings.catch_warnings():
            # shape checks become constants in the traced graph: intended, the input size is fixed
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")
            if format == "torchscript":
                torch.jit.trace(model, example, check_trace=False).save(str(tmp))
            else:
                require("onnx", "onnx", "ONNX export")
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    input_names=["images"],
                    output_names=["logits"],
                    opset_version=opset,
                    dynamo=False,
                )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    check = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(check)
        got = _run_exported(out, format, check)
    rel = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if not rel <= tolerance:
        raise ExportError(f"{out} differs from the eager model: max relative difference {rel:.2e} > {tolerance:.0e}")
    return ExportResult(out, format, shape, rel)


def _run_exported(path: Path, format: str, x: torch.Tensor) -> torch.Tensor:
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")
            return torch.jit.load(str(path))(x)
    ort = require("onnxruntime", "onnx", "Checking an ONNX export")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
