"""Vision Mamba's bidirectional mixer ("bimamba v2"), with Mamba's parameter names.

One ``in_proj`` and one ``out_proj`` are shared; each direction has its own causal depthwise
conv, ``x_proj``, ``dt_proj``, ``A_log`` and ``D`` (the backward ones suffixed ``_b``). The
backward direction runs on the flipped sequence and is flipped back; the two outputs are
averaged before ``out_proj``. Both directions go through one selective-scan call, as two
channel groups with their own B and C.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esh.ops import selective_scan

from .mamba_init import init_dt_proj


class BiMambaMixer(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        divide_out: bool = True,
    ):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.divide_out = divide_out
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)
        for suffix in ("", "_b"):
            conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
            x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
            init_dt_proj(dt_proj, self.dt_rank, dt_min, dt_max, dt_init_floor)
            setattr(self, f"conv1d{suffix}", conv)
            setattr(self, f"x_proj{suffix}", x_proj)
            setattr(self, f"dt_proj{suffix}", dt_proj)
        self.A_log = nn.Parameter(A_log.clone())
        self.D = nn.Parameter(torch.ones(d_inner))
        self.A_b_log = nn.Parameter(A_log.clone())
        self.D_b = nn.Parameter(torch.ones(d_inner))

    def _branch(self, x: Tensor, conv: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear):
        seqlen = x.shape[-1]
        u = F.silu(conv(x)[..., :seqlen])  # causal: left padding d_conv - 1
        dt, B, C = torch.split(x_proj(u.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)  # the bias goes to the scan
        return u, delta, B.transpose(1, 2), C.transpose(1, 2)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(batch, L, d_model) -> (batch, L, d_model)."""
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (batch, d_inner, L)
        xb, zb = x.flip(-1), z.flip(-1)
        u_f, dt_f, B_f, C_f = self._branch(x, self.conv1d, self.x_proj, self.dt_proj)
        u_b, dt_b, B_b, C_b = self._branch(xb, self.conv1d_b, self.x_proj_b, self.dt_proj_b)
        # both directions in one scan: channels [forward | backward], one B/C group each
        y = selective_scan(
            torch.cat([u_f, u_b], 1),
            torch.cat([dt_f, dt_b], 1),
            -torch.exp(torch.cat([self.A_log, self.A_b_log], 0).float()),
            torch.stack([B_f, B_b], 1),
            torch.stack([C_f, C_b], 1),
            torch.cat([self.D, self.D_b], 0).float(),
            z=torch.cat([z, zb], 1),
            delta_bias=torch.cat([self.dt_proj.bias, self.dt_proj_b.bias], 0).float(),
            delta_softplus=True,
        )
        y_f, y_b = y.chunk(2, dim=1)
        y = y_f + y_b.flip(-1)
        if self.divide_out:
            y = y / 2
        return self.out_proj(y.transpose(1, 2))
