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

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(batch, L, d_model) -> (batch, L, d_model).

        Everything between ``in_proj`` and ``out_proj`` runs channel-major, (batch, channels, L),
        the layout the scan takes: the projections are matrix products with the weight on the
        left, so no activation is ever transposed, and the two directions share one conv, one
        batched ``x_proj``, one batched ``dt_proj`` and one scan.
        """
        batch, seqlen, _ = hidden_states.shape
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        xz = torch.matmul(self.in_proj.weight, hidden_states.transpose(1, 2))  # (batch, 2d, L)
        # channels [forward | backward]: the backward direction reads the sequence reversed
        x, z = xz[:, :d], xz[:, d:]
        x, z = torch.cat([x, x.flip(-1)], 1), torch.cat([z, z.flip(-1)], 1)
        del xz  # (long sequences: peak memory is a handful of these (batch, 2d, L) tensors)
        u = F.conv1d(
            x,
            torch.cat([self.conv1d.weight, self.conv1d_b.weight], 0),
            torch.cat([self.conv1d.bias, self.conv1d_b.bias], 0),
            padding=self.d_conv - 1,
            groups=2 * d,
        )[..., :seqlen]
        del x
        u = F.silu(u)
        x_dbl = torch.matmul(  # (2, r + 2n, d) @ (batch, 2, d, L) -> (batch, 2, r + 2n, L)
            torch.stack([self.x_proj.weight, self.x_proj_b.weight]), u.view(batch, 2, d, seqlen)
        )
        dt, B, C = torch.split(x_dbl, [r, n, n], dim=2)
        delta = torch.matmul(torch.stack([self.dt_proj.weight, self.dt_proj_b.weight]), dt)  # bias: in the scan
        y = selective_scan(
            u,
            delta.view(batch, 2 * d, seqlen),
            -torch.exp(torch.cat([self.A_log, self.A_b_log], 0).float()),
            B,
            C,
            torch.cat([self.D, self.D_b], 0).float(),
            z=z,
            delta_bias=torch.cat([self.dt_proj.bias, self.dt_proj_b.bias], 0).float(),
            delta_softplus=True,
        )
        y = y[:, :d] + y[:, d:].flip(-1)
        if self.divide_out:
            y = y / 2
        return torch.matmul(y.transpose(1, 2), self.out_proj.weight.t())
