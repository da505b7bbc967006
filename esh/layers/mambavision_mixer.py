"""MambaVision's token mixer: a non-causal Mamba with a symmetric conv branch.

Unlike Mamba's mixer, the input projection is split into two halves of equal width: the SSM
branch (depthwise conv, SiLU, selective scan) and a second branch (depthwise conv, SiLU) that
is concatenated with the scan output rather than used as a gate. Both convolutions are
symmetric ("same" padding), since image tokens have no causal order. Parameter names are the
official ones (``in_proj``, ``conv1d_x``, ``conv1d_z``, ``x_proj``, ``dt_proj``, ``A_log``,
``D``, ``out_proj``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esh._compat import import_timm
from esh.ops import selective_scan

from .mamba_init import init_dt_proj

# torch.fx calls the scan rather than tracing it: its dispatcher picks a backend per call
import_timm().layers.register_notrace_function(selective_scan)


def _conv1d_same(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """The depthwise ``conv`` with PyTorch's "same" padding, written with explicit pads so that
    it exports to ONNX (the same zeros: (k-1)//2 on the left, k//2 on the right). The sizes come
    from the module, not the weight's shape, so that torch.fx traces this without a branch."""
    k = conv.kernel_size[0]
    left, right = (k - 1) // 2, k // 2
    if left == right:
        return F.conv1d(x, conv.weight, padding=left, groups=conv.groups)
    return F.conv1d(F.pad(x, (left, right)), conv.weight, groups=conv.groups)


class MambaVisionMixer(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 8,
        d_conv: int = 3,
        expand: int = 1,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_inner = int(expand * d_model)
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        half = self.d_inner // 2
        self.in_proj = nn.Linear(d_model, self.d_inner, bias=False)
        self.x_proj = nn.Linear(half, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, half, bias=True)
        # Mamba's dt initialisation (MambaVision's network-wide init later overwrites Linears)
        init_dt_proj(self.dt_proj, self.dt_rank, dt_min, dt_max, dt_init_floor)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(half, 1))
        self.D = nn.Parameter(torch.ones(half))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.conv1d_x = nn.Conv1d(half, half, kernel_size=d_conv, groups=half, bias=False)
        self.conv1d_z = nn.Conv1d(half, half, kernel_size=d_conv, groups=half, bias=False)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(batch, L, d_model) -> (batch, L, d_model)."""
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (batch, d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(_conv1d_same(x, self.conv1d_x))
        z = F.silu(_conv1d_same(z, self.conv1d_z))
        x_dbl = self.x_proj(x.transpose(1, 2))  # (batch, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj applies its bias and the scan adds it again: the official model's softplus
        # argument is W dt + 2 b, and its checkpoints were trained that way
        dt = self.dt_proj(dt).transpose(1, 2)  # (batch, half, L)
        A = -torch.exp(self.A_log.float())
        y = selective_scan(
            x,
            dt,
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            self.D.float(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        return self.out_proj(torch.cat([y, z], dim=1).transpose(1, 2))
