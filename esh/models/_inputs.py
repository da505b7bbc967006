"""Input checks shared by the vision families: a clear InputError instead of a shape or dtype
error from deep inside a convolution.

Floating-point images of another dtype than the model's (float64 arrays from NumPy, float16 or
bfloat16 batches into a float32 model) are cast to the model's dtype, as a convolution needs;
integer images (uint8 pixels) are refused, because they must be normalised first.

A check returns its input and the model goes on with the returned tensor, and torch.fx calls
the check instead of tracing it (``register_notrace_function``): a traced graph keeps the
check, as a node that dead-code elimination cannot drop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from esh._compat import import_timm
from esh.errors import InputError

register_notrace_function = import_timm().layers.register_notrace_function


@register_notrace_function
def check_image_batch(x: object, in_chans: int, family: str, dtype: torch.dtype | None = None) -> Tensor:
    """``x`` must be a (batch, in_chans, height, width) floating-point tensor with a non-empty
    batch and image; returns ``x``, cast to ``dtype`` (the model's) when given and different."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"{family} expects images (batch, {in_chans}, height, width); got {shape}")
    if x.shape[1] != in_chans:
        raise InputError(
            f"{family} expects {in_chans} input channels, got {x.shape[1]} (input {tuple(x.shape)}); "
            f"expand grey images to {in_chans} channels or build the model with in_chans={x.shape[1]}"
        )
    if x.shape[0] == 0 or min(x.shape[2:]) < 1:
        raise InputError(f"{family} needs a non-empty batch and height, width >= 1; got {tuple(x.shape)}")
    return cast_images(x, family, dtype)


def cast_images(x: Tensor, family: str, dtype: torch.dtype | None) -> Tensor:
    """A floating-point ``x`` in ``dtype`` (unchanged when it already is, or ``dtype`` is None);
    an InputError for integer, bool or complex images."""
    if not x.is_floating_point():
        raise InputError(
            f"{family} expects floating-point images (normalised pixels, as the model's transforms make "
            f"them); got {x.dtype}"
        )
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    return x


def parameter_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first parameter (None without parameters). Read through
    ``parameters()``, which torch.fx does not turn into graph nodes."""
    param = next(module.parameters(), None)
    return None if param is None else param.dtype
