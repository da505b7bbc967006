"""Mamba-2 mixer (Dao & Gu, 2024) in pure PyTorch, with mamba_ssm's parameter names and recurrent API.

One ``in_proj`` gives the gate ``z``, the SSM input ``x``, the shared ``B`` and ``C`` of
``ngroups`` groups and one step ``dt`` per head; ``x``, ``B`` and ``C`` go through a causal
depthwise ``conv1d`` and SiLU. Each head has a scalar ``A = -exp(A_log)`` and skip ``D``; the
output is ``out_proj(RMSNorm(y * silu(z)))``.

A scalar A per head makes Mamba-2's recurrence a selective scan whose channels share their
head's step and A and whose B/C are grouped, so the sequence path runs on
``esh.ops.selective_scan`` (grouped B/C, chunked on any device) and ``step`` on the multi-head
form of ``esh.ops.selective_state_update``. mamba_ssm's fused SSD kernels are not used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esh.errors import InputError
from esh.ops import selective_scan, selective_state_update

from .mamba import copy_unless_loaded, mask_padding
from .norm import RMSNorm

__all__ = ["Mamba2"]


class Mamba2(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        norm_eps: float = 1e-5,
        dt_rank: int | str | None = None,  # accepted for a Mamba-1-compatible signature; Mamba-2 has none
    ):
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = d_inner = int(expand * d_model)
        headdim = min(headdim, d_inner)
        if d_inner % headdim:
            raise InputError(f"Mamba2: d_inner={d_inner} (expand * d_model) must be a multiple of headdim={headdim}")
        self.headdim, self.nheads = headdim, d_inner // headdim
        if self.nheads % ngroups:
            raise InputError(f"Mamba2: ngroups={ngroups} must divide the number of heads {self.nheads}")
        self.ngroups = ngroups
        self._init = (A_init_range, dt_min, dt_max, dt_init_floor)
        self.conv_dim = d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.empty(self.nheads))
        self.A_log._no_weight_decay = self.D._no_weight_decay = True  # as mamba_ssm: trainers skip them
        self.norm = RMSNorm(d_inner, eps=norm_eps)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self) -> None:
        """A uniform in ``A_init_range`` per head, D = 1, dt_bias = inverse softplus of a step
        drawn log-uniformly in [dt_min, dt_max] (mamba_ssm's Mamba2 init)."""
        (a_lo, a_hi), dt_min, dt_max, floor = self._init
        device = self.A_log.device
        A = torch.empty(self.nheads, device=device).uniform_(a_lo, a_hi)
        copy_unless_loaded(self.A_log, torch.log(A))
        copy_unless_loaded(self.D, torch.ones(self.nheads, device=device))
        dt = torch.exp(
            torch.rand(self.nheads, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=floor)
        copy_unless_loaded(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int = 0, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """Conv state (batch, conv_dim, d_conv) and SSM state (batch, nheads, headdim, d_state),
        the latter in float32 or wider."""
        device = self.conv1d.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device, dtype=conv_dtype)
        ssm_dtype = torch.promote_types(self.A_log.dtype, torch.float32)
        shape = (batch_size, self.nheads, self.headdim, self.d_state)
        return conv_state, torch.zeros(shape, device=device, dtype=ssm_dtype)

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _gated_out(self, y: Tensor, z: Tensor) -> Tensor:
        return self.out_proj(self.norm(y * F.silu(z)))

    def forward(
        self,
        hidden_states: Tensor,
        conv_state: Tensor | None = None,
        ssm_state: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """(batch, L, d_model) -> (batch, L, d_model) from the zero state; given states are
        overwritten with those after the last token (prefill). ``mask`` (batch, L) bool is False at
        left padding, which then contributes nothing to the conv or the state (as in ``Mamba``)."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise InputError(f"Mamba2: expected input (batch, L, {self.d_model}); got {tuple(hidden_states.shape)}")
        batch, seqlen, _ = hidden_states.shape
        z, xbc, dt = self._split(self.in_proj(hidden_states))
        xbc = mask_padding(xbc.transpose(1, 2), mask)  # (batch, conv_dim, L)
        if conv_state is not None:
            conv_state.copy_(F.pad(xbc, (self.d_conv - seqlen, 0)))
        xbc = mask_padding(F.silu(self.conv1d(xbc)[..., :seqlen]), mask)
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=1)
        p = self.headdim
        delta = dt.transpose(1, 2).repeat_interleave(p, dim=1)  # every channel takes its head's step
        A = (-torch.exp(self.A_log.float())).repeat_interleave(p)[:, None].expand(self.d_inner, self.d_state)
        y = selective_scan(
            x,
            delta,
            A,
            B.reshape(batch, self.ngroups, self.d_state, seqlen),
            C.reshape(batch, self.ngroups, self.d_state, seqlen),
            self.D.float().repeat_interleave(p),
            delta_bias=self.dt_bias.float().repeat_interleave(p),
            delta_softplus=True,
            return_last_state=ssm_state is not None,
        )
        if ssm_state is not None:
            y, last = y
            ssm_state.copy_(last.view(batch, self.nheads, p, self.d_state))
        return self._gated_out(y.transpose(1, 2), z)

    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One token (batch, 1, d_model); both states are updated in place."""
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
            raise InputError(f"Mamba2.step: expected one token (batch, 1, d_model); got {tuple(hidden_states.shape)}")
        dtype = hidden_states.dtype
        batch = hidden_states.shape[0]
        z, xbc, dt = self._split(self.in_proj(hidden_states.squeeze(1)))
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = xbc
        xbc = (conv_state * self.conv1d.weight.squeeze(1)).sum(-1) + self.conv1d.bias
        xbc = F.silu(xbc).to(dtype)
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xbc, [self.d_inner, gn, gn], dim=-1)
        h, p, n = self.nheads, self.headdim, self.d_state
        y = selective_state_update(
            ssm_state,
            x.reshape(batch, h, p),
            dt[..., None].expand(batch, h, p),
            (-torch.exp(self.A_log.float()))[:, None, None].expand(h, p, n),
            B.reshape(batch, self.ngroups, n),
            C.reshape(batch, self.ngroups, n),
            self.D.float()[:, None].expand(h, p),
            dt_bias=self.dt_bias.float()[:, None].expand(h, p),
            dt_softplus=True,
        )
        return self._gated_out(y.reshape(batch, self.d_inner), z).unsqueeze(1), conv_state, ssm_state
