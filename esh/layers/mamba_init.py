"""Mamba's initialisation of the step projection, shared by every mixer."""

from __future__ import annotations

import math

import torch
from torch import nn


def init_dt_proj(dt_proj: nn.Linear, dt_rank: int, dt_min: float = 0.001, dt_max: float = 0.1, floor: float = 1e-4):
    """Weight uniform in ±dt_rank^-0.5; bias the inverse softplus of a step drawn log-uniformly
    in [dt_min, dt_max] (at least ``floor``), so that softplus(bias) starts at that step."""
    std = dt_rank**-0.5
    nn.init.uniform_(dt_proj.weight, -std, std)
    n = dt_proj.out_features
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    with torch.no_grad():
        dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
