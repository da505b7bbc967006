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

    def forward(self, hidden_states: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(batch, L, d_model) -> (batch, L, d_model).

        ``lengths`` (batch,), for padded batches of sequences of different lengths: the number
        of valid tokens at the start of each sequence. The forward direction is causal, so
        trailing padding never reaches them; the backward direction reverses each sequence's
        own first ``lengths[b]`` tokens. Outputs at padded positions are meaningless.

        Everything runs sequence-major, (batch, L, channels), the layout ``in_proj`` produces
        and ``out_proj`` consumes; the scan takes these tensors as (batch, channels, L) views and
        works on them without a transpose. The two directions are one set of channels
        [forward | backward] (the backward half reads the sequence reversed): one scan. The gate
        silu(z) multiplies both directions alike, so it is applied once, after the backward
        output is flipped back and added: (y_f + flip(y_b)) * silu(z), the same value as gating
        each direction inside the scan.
        """
        batch, seqlen, _ = hidden_states.shape
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        if lengths is None:

            def rev(t: Tensor) -> Tensor:
                return t.flip(1)
        else:
            index = reverse_index(lengths, seqlen).unsqueeze(-1)

            def rev(t: Tensor) -> Tensor:
                return t.gather(1, index.expand_as(t))

        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (batch, L, d) each
        u = torch.cat([_causal_conv(x, self.conv1d), _causal_conv(rev(x), self.conv1d_b)], -1)
        gate = F.silu(z)
        del x, z  # in_proj's output is freed (long sequences: peak memory is a few (batch, L, 2d) tensors)
        u = F.silu(u)
        x_dbl = torch.stack([self.x_proj(u[..., :d]), self.x_proj_b(u[..., d:])], 2)  # (batch, L, 2, r + 2n)
        dt, B, C = torch.split(x_dbl, [r, n, n], dim=-1)
        delta = torch.cat([dt[:, :, 0] @ self.dt_proj.weight.t(), dt[:, :, 1] @ self.dt_proj_b.weight.t()], -1)
        y = selective_scan(  # (batch, channels, L) views of the sequence-major tensors
            u.transpose(1, 2),
            delta.transpose(1, 2),  # dt_proj's bias goes to the scan
            -torch.exp(torch.cat([self.A_log, self.A_b_log], 0).float()),
            B.permute(0, 2, 3, 1),
            C.permute(0, 2, 3, 1),
            torch.cat([self.D, self.D_b], 0).float(),
            delta_bias=torch.cat([self.dt_proj.bias, self.dt_proj_b.bias], 0).float(),
            delta_softplus=True,
        ).transpose(1, 2)
        y = (y[..., :d] + rev(y[..., d:])).mul_(gate)
        if self.divide_out:
            y = y.div_(2)
        return self.out_proj(y)


def reverse_index(lengths: Tensor, seqlen: int) -> Tensor:
    """(batch,) lengths -> (batch, seqlen) index that reverses each sequence's first ``lengths[b]``
    positions and leaves the padding after them in place (the index is its own inverse)."""
    t = torch.arange(seqlen, device=lengths.device)
    n = lengths.view(-1, 1).to(t.dtype)
    return torch.where(t < n, n - 1 - t, t)


def _causal_conv(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """Depthwise causal conv of (batch, L, d) in that layout: out[t] = bias + sum_j w[K-1-j] x[t-j],
    as K shifted multiply-adds (no transpose to conv1d's layout, no padded copy)."""
    w = conv.weight[:, 0]  # (d, K)
    k = w.shape[1]
    out = torch.addcmul(conv.bias, x, w[:, k - 1])
    for j in range(1, min(k, x.shape[1])):
        out[:, j:].addcmul_(x[:, :-j], w[:, k - 1 - j])
    return out
