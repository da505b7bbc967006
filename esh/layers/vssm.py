"""ESH-Vision's SSM path: a bidirectional Mamba over raster-ordered patches.

``BidirectionalVSSM`` is Vision Mamba's "bimamba v2" mixer (``esh.layers.BiMambaMixer``: shared
``in_proj``/``out_proj``, per-direction conv, ``x_proj``, ``dt_proj``, ``A_log``, ``D``, both
directions in one grouped ``esh.ops.selective_scan`` call) that also takes padded batches of
sequences of different lengths: with ``lengths``, each sequence's reverse direction runs over its
own first ``lengths[b]`` tokens only. Hard routing uses this to scan just the patches routed to
the SSM, in raster order, without the patches routed to attention.
"""

from __future__ import annotations

import torch
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

        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (batch, d_inner, L)
        xb, zb = rev(x), rev(z)
        u_f, dt_f, B_f, C_f = self._branch(x, self.conv1d, self.x_proj, self.dt_proj)
        u_b, dt_b, B_b, C_b = self._branch(xb, self.conv1d_b, self.x_proj_b, self.dt_proj_b)
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
        y = y_f + rev(y_b)
        if self.divide_out:
            y = y / 2
        return self.out_proj(y.transpose(1, 2))
