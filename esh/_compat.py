"""Imports of optional or fragile dependencies, in one place.

torchvision ships compiled operators built against one exact torch. Next to another torch
build (for example the CPU wheel of torch 2.13.0 beside torchvision 0.28.0) its import
dies with ``RuntimeError: operator torchvision::nms does not exist`` while registering
fake kernels for those operators, and timm, which imports torchvision, dies with it.
``import_torchvision`` catches exactly that failure, declares the schemas of the missing
operators so the pure-Python side of torchvision imports, and warns once that its
detection ops are unavailable. Everything in esh imports timm and torchvision through here.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import warnings
from types import ModuleType

import torch

# Schemas of the torchvision operators whose fake kernels are registered at import time
# without checking that the compiled library loaded.
_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")
_stub_library: torch.library.Library | None = None  # must stay alive to keep the definitions
_warned = False


def _forget_partial_import(prefix: str) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]


def _declare_torchvision_schemas() -> None:
    global _stub_library
    if _stub_library is None:
        _stub_library = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _TORCHVISION_SCHEMAS.items():
        if not _op_exists(name):
            _stub_library.define(schema)


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _warn_once(op: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"torchvision's compiled operators do not match this torch build (torchvision::{op} "
            "was missing); esh declared their schemas so timm and torchvision's Python side work, "
            "but torchvision's detection ops (nms, roi_align, ...) are unavailable. Install the "
            "torchvision build made for your torch to get them.",
            RuntimeWarning,
            stacklevel=3,
        )


def import_torchvision() -> ModuleType:
    """``import torchvision``, surviving a torchvision built for another torch."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as e:
        match = _MISSING_OP.search(str(e))
        if match is None:
            raise
        _forget_partial_import("torchvision")
        _declare_torchvision_schemas()
        module = importlib.import_module("torchvision")
        _warn_once(match.group(1))
        return module


def import_timm() -> ModuleType:
    """``import timm`` (through ``import_torchvision``)."""
    if "timm" not in sys.modules:
        import_torchvision()
    return importlib.import_module("timm")


def has_module(name: str) -> bool:
    """Whether an optional dependency is installed, without importing it."""
    return importlib.util.find_spec(name) is not None


def require(name: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency or explain how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"{purpose} needs the optional package {name!r}: pip install 'esh[{extra}]'") from e
