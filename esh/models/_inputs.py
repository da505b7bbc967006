"""Input checks shared by the vision families: a clear ValueError instead of a shape error
from deep inside a convolution.

A check returns its input and the model goes on with the returned tensor, and torch.fx calls
the check instead of tracing it (``register_notrace_function``): a traced graph keeps the
check, as a node that dead-code elimination cannot drop.
"""

from __future__ import annotations

from torch import Tensor

from esh._compat import import_timm
from esh.errors import InputError

register_notrace_function = import_timm().layers.register_notrace_function


@register_notrace_function
def check_image_batch(x: object, in_chans: int, family: str, floating: bool = False) -> Tensor:
    """``x`` must be a (batch, in_chans, height, width) tensor with a non-empty batch and image
    (and of a floating-point dtype when ``floating``); returns ``x``."""
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
    if floating and not x.is_floating_point():
        raise InputError(f"{family} expects floating-point images; got {x.dtype}")
    return x
