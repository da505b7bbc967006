"""Zero padding of image maps to whole patches or windows (right and bottom), and the crop back.

Both branch on the size of their input, so torch.fx calls them instead of tracing them
(``register_notrace_function``: timm's FX feature extraction): a traced graph pads whatever
size it is given, as the eager model does, and an input that needs no padding is not copied.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from esh._compat import import_timm

register_notrace_function = import_timm().layers.register_notrace_function

__all__ = ["crop_to", "pad_to_multiple"]


@register_notrace_function
def pad_to_multiple(x: Tensor, multiple: int, channels_last: bool = False) -> Tensor:
    """Zero-pad the height and width of a (B, C, H, W) map, or (B, H, W, C) with
    ``channels_last``, at the bottom and right to multiples of ``multiple``; ``x`` itself when
    they already are."""
    h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return x
    return F.pad(x, (0, 0, 0, pw, 0, ph) if channels_last else (0, pw, 0, ph))


@register_notrace_function
def crop_to(x: Tensor, height: int, width: int) -> Tensor:
    """The top-left ``height`` x ``width`` of a (B, C, H, W) map, contiguous; ``x`` itself when
    it has that size (undoes ``pad_to_multiple``)."""
    if x.shape[2] == height and x.shape[3] == width:
        return x
    return x[:, :, :height, :width].contiguous()
