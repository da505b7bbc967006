"""One reading of a ``--device`` / ``device=`` argument for every command and trainer."""

from __future__ import annotations

import torch

from esh.errors import InputError

KINDS = ("cpu", "cuda", "mps")


def resolve_device(spec: str | torch.device | None, *, default: str = "cpu") -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"auto"`` (CUDA when there is one, else
    the CPU) as a :class:`torch.device` that exists on this machine, or an :class:`InputError`
    that says what is available."""
    if spec is None:
        spec = default
    if isinstance(spec, torch.device):
        device = spec
    else:
        text = str(spec).strip().lower()
        if text == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(text)
        except (RuntimeError, ValueError):
            raise InputError(f"unknown device {spec!r}: expected cpu, cuda, cuda:N, mps or auto") from None
    if device.type not in KINDS:
        raise InputError(f"unsupported device {spec!r}: expected cpu, cuda, cuda:N, mps or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {spec!r} asked for, but this torch sees no CUDA GPU (use --device cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise InputError(f"device {spec!r} asked for, but there are only {count} CUDA device(s)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"device {spec!r} asked for, but MPS is not available here (use --device cpu)")
    return device
