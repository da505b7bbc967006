"""Per-patch pixel entropy: the parameter-free complexity prior of ESH-Vision's router.

Each image is turned into grey levels (the mean over its channels), quantised into ``bins``
levels between that image's own minimum and maximum (so any input normalisation gives the
same prior), and every ``patch`` x ``patch`` patch gets the histogram of its levels. The
entropy of a histogram, divided by ``log(bins)``, lies in [0, 1]: 0 for a flat patch, near 1
for noise. Histograms of larger patches are sums of the histograms of the patches they cover,
so later stages get the exact entropy of their larger receptive patch by 2x2 sum-pooling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from esh._compat import import_timm
from esh.errors import InputError

register_notrace_function = import_timm().layers.register_notrace_function

__all__ = ["grey_levels", "histogram_entropy", "patch_histograms", "pool_histograms"]


def grey_levels(images: Tensor, bins: int) -> Tensor:
    """(B, C, H, W) images -> (B, H, W) integer grey levels in [0, bins), per-image min-max scaled."""
    if images.dim() != 4:
        raise InputError(f"grey_levels expects images (batch, channels, height, width); got {tuple(images.shape)}")
    if bins < 2:
        raise InputError(f"the entropy prior needs at least 2 bins; got {bins}")
    grey = images.detach().float().mean(1)
    lo = grey.amin((1, 2), keepdim=True)
    hi = grey.amax((1, 2), keepdim=True)
    scaled = (grey - lo) / (hi - lo).clamp_min(1e-12)
    return (scaled * bins).long().clamp_(0, bins - 1)


@register_notrace_function
def patch_histograms(images: Tensor, patch: int, bins: int = 16) -> Tensor:
    """(B, C, H, W) -> (B, ceil(H/patch), ceil(W/patch), bins) counts of grey levels per patch.

    Pixels of the zero padding that completes the last row/column of patches are not counted.
    torch.fx calls this function instead of tracing it (it branches on the image size).
    """
    levels = grey_levels(images, bins)
    B, H, W = levels.shape
    ph, pw = -H % patch, -W % patch
    if ph or pw:  # padding falls into an extra bin that is dropped below
        levels = F.pad(levels, (0, pw, 0, ph), value=bins)
    Hp, Wp = (H + ph) // patch, (W + pw) // patch
    patch_id = torch.arange(Hp * Wp, device=levels.device).view(Hp, 1, Wp, 1).expand(Hp, patch, Wp, patch)
    index = (patch_id.reshape(1, -1) * (bins + 1) + levels.reshape(B, -1)).long()
    counts = levels.new_zeros(B, Hp * Wp * (bins + 1), dtype=torch.float32)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts.view(B, Hp, Wp, bins + 1)[..., :bins]


def pool_histograms(counts: Tensor) -> Tensor:
    """(B, H, W, bins) -> (B, ceil(H/2), ceil(W/2), bins): histograms of 2x2 groups of patches
    (the receptive patch after one patch merging; odd sizes are completed with empty patches)."""
    B, H, W, K = counts.shape
    counts = F.pad(counts, (0, 0, 0, W % 2, 0, H % 2))
    return counts.view(B, (H + 1) // 2, 2, (W + 1) // 2, 2, K).sum((2, 4))


def histogram_entropy(counts: Tensor) -> Tensor:
    """(..., bins) counts -> (...) Shannon entropy / log(bins), in [0, 1]; 0 for an empty histogram."""
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    return -torch.special.xlogy(p, p).sum(-1) / math.log(counts.shape[-1])
