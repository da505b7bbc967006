"""Mixed precision, one policy for training, evaluation and embedding.

``amp_dtype=None`` picks bfloat16 on the CPU and on GPUs that compute in it natively (Ampere
and newer), float16 on older GPUs; float16 training on CUDA needs a gradient scaler, bfloat16
(same exponent range as float32) does not. Float32 matmuls on Ampere and newer run on the
TF32 tensor cores (10-bit mantissa products, float32 accumulation).
"""

from __future__ import annotations

import contextlib

import torch

from esh.errors import InputError

AMP_DTYPES = ("bfloat16", "float16")


def amp_dtype_for(device: torch.device, amp_dtype: str | None = None) -> torch.dtype:
    """The autocast dtype: ``amp_dtype`` when given, else bfloat16 where the device computes in
    it natively (CPU, CUDA with ``is_bf16_supported``), float16 otherwise."""
    if amp_dtype is not None:
        if amp_dtype not in AMP_DTYPES:
            raise InputError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)}; got {amp_dtype!r}")
        return getattr(torch, amp_dtype)
    if device.type == "cpu":
        return torch.bfloat16
    if device.type == "cuda":
        # without emulation: an older GPU emulates bfloat16 slowly, float16 runs on its tensor cores
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float16


def autocast(device: torch.device, amp: bool, amp_dtype: str | None = None):
    """The autocast context for a forward pass: a no-op unless ``amp``."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype_for(device, amp_dtype))


def grad_scaler(device: torch.device, amp: bool, amp_dtype: str | None = None) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for float16 autocast on CUDA (where small gradients
    would underflow); disabled it passes everything through."""
    enabled = amp and device.type == "cuda" and amp_dtype_for(device, amp_dtype) == torch.float16
    return torch.amp.GradScaler(device.type, enabled=enabled)


def enable_tf32(device: torch.device) -> bool:
    """TF32 for float32 matmuls and convolutions on CUDA devices of compute capability 8 or
    more (Ampere and newer); True when turned on. Other devices are left as they are."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True
