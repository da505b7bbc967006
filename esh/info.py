"""Parameters and multiply-adds of a model at a given input size.

Counted on the meta device (no memory, no arithmetic) with ``torch.utils.flop_counter``,
which sees matmuls, convolutions and attention. The selective scan is elementwise work that
the counter does not see; esh counts it itself from each scan call's shape: per state
element and step one exp, and multiply-adds for the decay, the input and the read-out, the
convention (9 FLOPs) of mamba_ssm's reference FLOP counter.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

SCAN_FLOPS_PER_ELEMENT = 9


@dataclass
class ModelInfo:
    name: str
    params: int
    input_size: tuple[int, int, int]
    macs_matmul_conv: float
    macs_attention: float
    flops_scan: float

    @property
    def total_gflops(self) -> float:
        return (2 * (self.macs_matmul_conv + self.macs_attention) + self.flops_scan) / 1e9

    def format(self) -> str:
        c, h, w = self.input_size
        return "\n".join(
            [
                f"{self.name}: {self.params / 1e6:.2f}M parameters, input {c}x{h}x{w}",
                f"  conv + linear    {self.macs_matmul_conv / 1e9:8.2f} GMACs  (the convention of the official tables)",
                f"  attention (SDPA) {self.macs_attention / 1e9:8.2f} GMACs",
                f"  selective scan   {self.flops_scan / 1e9:8.2f} GFLOPs "
                f"({SCAN_FLOPS_PER_ELEMENT} per state element and step)",
                f"  total            {self.total_gflops:8.2f} GFLOPs (2 per multiply-add)",
            ]
        )


# attention: SDPA, or the batched matmuls it decomposes into on the meta device
_ATTENTION_OPS = ("scaled_dot_product", "_flash_attention", "_efficient_attention", "aten.bmm")


def count_model(model: nn.Module, input_size: tuple[int, int, int], name: str = "model") -> ModelInfo:
    """Parameters and operation counts of one forward pass on a single image."""
    params = sum(p.numel() for p in model.parameters())
    scan_flops = [0.0]
    dispatch = importlib.import_module("esh.ops.selective_scan")  # the package, not the function
    original = dict(dispatch._IMPLS)

    def counting(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        # the shape is all that matters on the meta device: count, and return empty outputs
        scan_flops[0] += SCAN_FLOPS_PER_ELEMENT * u.shape[0] * u.shape[1] * u.shape[2] * A.shape[1]
        out = torch.empty_like(u)
        return (out, u.new_empty(u.shape[0], u.shape[1], A.shape[1])) if return_last_state else out

    # count on a meta copy: the caller's model keeps its weights, device and train/eval mode
    meta = copy.deepcopy(model).to("meta")
    x = torch.empty(1, *input_size, device="meta")
    counter = FlopCounterMode(display=False)
    try:
        for key in dispatch._IMPLS:
            dispatch._IMPLS[key] = counting
        with counter, torch.no_grad():
            meta.eval()(x)
    finally:
        dispatch._IMPLS.update(original)
    by_op = counter.get_flop_counts()["Global"]
    macs_attention = sum(v for op, v in by_op.items() if any(a in str(op) for a in _ATTENTION_OPS)) / 2
    total = counter.get_total_flops() / 2
    return ModelInfo(name, params, tuple(input_size), total - macs_attention, macs_attention, scan_flops[0])


def model_info(name: str, img_size: int | None = None, **kwargs) -> ModelInfo:
    """``esh info NAME``: build the model on the meta device and count it."""
    from esh.models import create_model

    with torch.device("meta"):
        model = create_model(name, **kwargs)
    c, h, w = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
    if img_size is not None:
        h = w = img_size
    return count_model(model, (c, h, w), name)
