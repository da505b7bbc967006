"""ESH-Vision's SSM path: a bidirectional Mamba over raster-ordered patches.

``BidirectionalVSSM`` is Vision Mamba's "bimamba v2" mixer with ``esh.layers.BiMambaMixer``'s
parameters and channel-major layout (shared ``in_proj``/``out_proj``, per-direction conv,
``x_proj``, ``dt_proj``, ``A_log``, ``D``, both directions in one grouped
``esh.ops.selective_scan`` call) that also takes padded batches of sequences of different
lengths: with ``lengths``, each sequence's reverse direction runs over its own first
``lengths[b]`` tokens only. Hard routing uses this to scan just the patches routed to
the SSM, in raster order, without the patches routed to attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from esh.ops import selective_scan

from .bimamba import BiMambaMixer

__all__ = ["BidirectionalVSSM"]


def reverse_index(lengths: Tensor, seqlen: int) -> Tensor:
    """(batch,) lengths -> (batch, seqlen) index that reverses each sequence's first ``lengths[b]``
    positions and leaves the padding after them in place (the index is its own inverse)."""
    t = torch.arange(seqlen, device=lengths.device)
    n = lengths.view(-1, 1).to(t.dtype)
    return torch.where(t < n, n - 1 - t, t)


class BidirectionalVSSM(BiMambaMixer):
    def forward(self, hidden_states: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(batch, L, d_model) -> (batch, L, d_model). ``lengths`` (batch,): the number of valid
        tokens at the start of each sequence (padding at the end); outputs at padded positions
        are meaningless. The forward direction is causal, so trailing padding never reaches
        the valid tokens; the reverse direction is reversed per sequence."""
        seqlen = hidden_states.shape[1]
        if lengths is None:

            def rev(t: Tensor) -> Tensor:
                return t.flip(-1)
        else:
            index = reverse_index(lengths, seqlen).unsqueeze(1)

            def rev(t: Tensor) -> Tensor:
                return t.gather(-1, index.expand_as(t))

        batch = hidden_states.shape[0]
        d, n, r = self.d_inner, self.d_state, self.dt_rank
        xz = torch.matmul(self.in_proj.weight, hidden_states.transpose(1, 2))  # (batch, 2d, L), channel-major
        x, z = xz[:, :d], xz[:, d:]
        # channels [forward | backward], one conv, one batched x_proj/dt_proj, one scan
        u = F.conv1d(
            torch.cat([x, rev(x)], 1),
            torch.cat([self.conv1d.weight, self.conv1d_b.weight], 0),
            torch.cat([self.conv1d.bias, self.conv1d_b.bias], 0),
            padding=self.d_conv - 1,
            groups=2 * d,
        )[..., :seqlen]
        u = F.silu(u)
        x_dbl = torch.matmul(torch.stack([self.x_proj.weight, self.x_proj_b.weight]), u.view(batch, 2, d, seqlen))
        dt, B, C = torch.split(x_dbl, [r, n, n], dim=2)
        delta = torch.matmul(torch.stack([self.dt_proj.weight, self.dt_proj_b.weight]), dt)
        y = selective_scan(
            u,
            delta.view(batch, 2 * d, seqlen),
            -torch.exp(torch.cat([self.A_log, self.A_b_log], 0).float()),
            B,
            C,
            torch.cat([self.D, self.D_b], 0).float(),
            z=torch.cat([z, rev(z)], 1),
            delta_bias=torch.cat([self.dt_proj.bias, self.dt_proj_b.bias], 0).float(),
            delta_softplus=True,
        )
        y = y[:, :d] + rev(y[:, d:])
        if self.divide_out:
            y = y / 2
        return torch.matmul(y.transpose(1, 2), self.out_proj.weight.t())
