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

from esh._compat import import_timm
from esh.ops import selective_scan
from esh.ops.selective_scan import cpu_kernel_is_default

from .conv import depthwise_conv
from .linear import low_rank_linear
from .mamba_init import init_dt_proj

register_notrace_module = import_timm().layers.register_notrace_module


# A leaf for torch.fx (called, not traced): the forward picks its path at run time, by
# sequence length (piecewise inference), grad and autocast mode (in-place buffers) and lengths.
@register_notrace_module
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
        # Inference on sequences longer than twice this many tokens runs piece by piece (see
        # _forward_segmented): activations O(segment) instead of O(L). None: never.
        self.segment_tokens: int | None = 1024

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
        segment = self.segment_tokens
        if lengths is None and segment and seqlen > 2 * segment and self._can_segment(hidden_states):
            return self._forward_segmented(hidden_states, segment)
        if lengths is None:

            def rev(t: Tensor) -> Tensor:
                return t.flip(1)
        else:
            index = reverse_index(lengths, seqlen).unsqueeze(-1)

            def rev(t: Tensor) -> Tensor:
                return t.gather(1, index.expand_as(t))

        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (batch, L, d) each
        # Results of the two directions go into the two halves of one tensor: written there in
        # place for inference, concatenated when autograd is recording (out= has no gradient)
        # or autocast is on (it does not cast for out= calls).
        # The convolutions give u; dt_proj gives delta, already in u's layout.
        in_place = not torch.is_grad_enabled() and not _autocast_enabled(x.device.type)
        if in_place:
            u = x.new_empty(batch, seqlen, 2 * d)
            _causal_conv(x, self.conv1d, out=u[..., :d])
            _causal_conv(rev(x), self.conv1d_b, out=u[..., d:])
        else:  # one conv over the channels [forward | backward], with one autograd node
            convs = (self.conv1d, self.conv1d_b)
            u = depthwise_conv(
                torch.cat([x, rev(x)], -1),
                torch.cat([c.weight[:, 0] for c in convs]),
                torch.cat([c.bias for c in convs]),
                activation="silu",
            )
        gate = F.silu(z)
        del x, z  # in_proj's output is freed (long sequences: peak memory is a few (batch, L, 2d) tensors)
        # x_proj of both directions as one batched matmul over [forward | backward] halves of u
        w_x = torch.stack([self.x_proj.weight, self.x_proj_b.weight]).transpose(1, 2)  # (2, d, r + 2n)
        x_dbl = torch.bmm(u.view(batch * seqlen, 2, d).transpose(0, 1), w_x)  # (2, batch * L, r + 2n)
        # split and unbind: one backward node each (a slice or index per piece would each
        # fill a zero tensor of x_dbl's size in the backward and add it up)
        dt, B, C = torch.split(x_dbl, [r, n, n], dim=-1)
        dt_f, dt_b = dt.unbind(0)
        weights = (self.dt_proj.weight, self.dt_proj_b.weight)
        if in_place:  # each direction's delta written into its half
            delta = u.new_empty(batch * seqlen, 2 * d)
            torch.mm(dt_f, weights[0].t(), out=delta[:, :d])
            torch.mm(dt_b, weights[1].t(), out=delta[:, d:])
        else:  # low_rank_linear: the C backward where autograd records (esh.layers.linear)
            delta = torch.cat([low_rank_linear(low, w) for low, w in zip((dt_f, dt_b), weights)], -1)
        delta = delta.view(batch, seqlen, 2 * d)
        B, C = (t.view(2, batch, seqlen, n).permute(1, 0, 3, 2) for t in (B, C))
        y = selective_scan(  # (batch, channels, L) views of the sequence-major tensors
            u.transpose(1, 2),
            delta.transpose(1, 2),  # dt_proj's bias goes to the scan
            -torch.exp(torch.cat([self.A_log, self.A_b_log], 0).float()),
            B,
            C,
            torch.cat([self.D, self.D_b], 0).float(),
            delta_bias=torch.cat([self.dt_proj.bias, self.dt_proj_b.bias], 0).float(),
            delta_softplus=True,
        ).transpose(1, 2)
        y_f, y_b = y.chunk(2, dim=-1)  # one backward node (two slices would each fill a zero y)
        y = rev(y_b).add_(y_f).mul_(gate)
        return F.linear(y, self._out_weight())

    def _out_weight(self) -> Tensor:
        """out_proj's weight, halved when the two directions are averaged: dividing by 2 is
        exact in floating point, so it is done on the (d_model, d) weight, not on y."""
        return self.out_proj.weight * 0.5 if self.divide_out else self.out_proj.weight

    def _can_segment(self, x: Tensor) -> bool:
        """Piecewise inference where the scan goes to the C kernel (float32 CPU inference of
        these sizes), the case it was made and measured for."""
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.is_grad_enabled()
            and not _autocast_enabled("cpu")
            and cpu_kernel_is_default(self.d_inner, self.d_state)
        )

    def _forward_segmented(self, hidden_states: Tensor, segment: int) -> Tensor:
        """The same output as ``forward``, for inference on long sequences, with activations of
        O(segment) tokens instead of O(L): out_proj is linear, so

            out_proj((y_f + flip(y_b)) * g / 2) = out_proj(y_f * g) / 2 + out_proj(flip(y_b) * g) / 2,

        and each direction runs over the sequence in pieces of ``segment`` tokens (the backward
        one from the end), carrying the scan state from piece to piece and giving each piece's
        causal convolution the d_conv - 1 tokens before it. in_proj is computed once per
        direction, so this costs one more in_proj per token than ``forward``."""
        batch, seqlen, _ = hidden_states.shape
        n, r, ctx = self.d_state, self.dt_rank, self.d_conv - 1
        out = hidden_states.new_empty(batch, seqlen, self.d_model)
        weight = self._out_weight()
        directions = (
            (self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D),
            (self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b),
        )
        for backward, (conv, x_proj, dt_proj, A_log, D) in enumerate(directions):
            A, D, bias = -torch.exp(A_log.float()), D.float(), dt_proj.bias.float()
            state = None
            for s0 in range(0, seqlen, segment):
                s1 = min(seqlen, s0 + segment)
                if not backward:  # positions s0..s1-1, after up to ctx tokens of context
                    t0, t1 = s0, s1
                    c0 = max(0, t0 - ctx)
                    x, z = self.in_proj(hidden_states[:, c0:t1]).chunk(2, dim=-1)
                    lead = t0 - c0
                else:  # reversed positions s0..s1-1: original t1-1 down to t0, context after t1
                    t0, t1 = seqlen - s1, seqlen - s0
                    c1 = min(seqlen, t1 + ctx)
                    x, z = self.in_proj(hidden_states[:, t0:c1]).chunk(2, dim=-1)
                    x, z, lead = x.flip(1), z[:, : t1 - t0], c1 - t1
                z = z[:, lead:] if not backward else z
                u = _causal_conv(x, conv)[:, lead:]  # (batch, T, d), in scan order
                dt, B, C = torch.split(x_proj(u), [r, n, n], dim=-1)
                delta = F.linear(dt, dt_proj.weight)
                y, state = selective_scan(
                    u.transpose(1, 2),
                    delta.transpose(1, 2),
                    A,
                    B.transpose(1, 2),
                    C.transpose(1, 2),
                    D,
                    delta_bias=bias,
                    delta_softplus=True,
                    return_last_state=True,
                    initial_state=state,
                )
                y = y.transpose(1, 2)
                if backward:
                    y = y.flip(1)
                part = F.linear(y.mul_(F.silu(z)), weight)
                if backward:
                    out[:, t0:t1] += part
                else:
                    out[:, t0:t1] = part
        return out


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta, for FLOP counting)
        return False


def reverse_index(lengths: Tensor, seqlen: int) -> Tensor:
    """(batch,) lengths -> (batch, seqlen) index that reverses each sequence's first ``lengths[b]``
    positions and leaves the padding after them in place (the index is its own inverse)."""
    t = torch.arange(seqlen, device=lengths.device)
    n = lengths.view(-1, 1).to(t.dtype)
    return torch.where(t < n, n - 1 - t, t)


def _causal_conv(x: Tensor, conv: nn.Conv1d, out: Tensor | None = None) -> Tensor:
    """Depthwise causal conv of (batch, L, d) in that layout and its SiLU:
    out[t] = silu(bias + sum_j w[K-1-j] x[t-j]) (``depthwise_conv``: no transpose, no padded
    copy); written into ``out`` when given."""
    return depthwise_conv(x, conv.weight[:, 0], conv.bias, out=out, activation="silu")
