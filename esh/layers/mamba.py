"""Mamba-1 causal mixer (Gu & Dao, 2023) with mamba_ssm's parameter names and recurrent API.

``in_proj`` splits into the SSM input ``x`` and the gate ``z``; ``x`` goes through a causal
depthwise ``conv1d`` and SiLU, ``x_proj`` gives the low-rank step ``dt`` and the
input-dependent ``B`` and ``C``, ``dt_proj`` lifts the step to every channel, and the selective
scan (``esh.ops.selective_scan``) runs with ``A = -exp(A_log)``, skip ``D`` and gate ``silu(z)``.

Generation follows ``mamba_ssm.modules.mamba_simple.Mamba``: ``allocate_inference_cache``
gives a conv state (the last ``d_conv`` pre-conv inputs, newest last) and an SSM state, a
``forward`` given those states fills them with the state after the sequence (prefill), and
``step`` advances them by one token in O(1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esh.errors import InputError
from esh.ops import selective_scan, selective_state_update

from .conv import depthwise_conv
from .linear import low_rank_linear
from .mamba_init import init_dt_proj

__all__ = ["Mamba", "copy_unless_loaded", "mask_padding"]


def mask_padding(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the padded positions of channel-major ``x`` (batch, channels, L); ``mask`` (batch, L)
    is True at real tokens (None: no padding)."""
    return x if mask is None else x * mask[:, None, :].to(x.dtype)


def copy_unless_loaded(param: Tensor, value: Tensor) -> None:
    """``param.copy_(value)`` without autograd, skipped for a tensor that Hugging Face's
    ``from_pretrained`` has already filled from a checkpoint (it marks those ``_is_hf_initialized``)."""
    if not getattr(param, "_is_hf_initialized", False):
        with torch.no_grad():
            param.copy_(value)


class Mamba(nn.Module):
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
        conv_bias: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        if d_model <= 0 or d_state <= 0 or d_conv <= 0 or expand <= 0:
            raise InputError(
                "Mamba: d_model, d_state, d_conv and expand must be positive; "
                f"got {d_model}, {d_state}, {d_conv}, {expand}"
            )
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self._dt_init = (dt_min, dt_max, dt_init_floor)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.A_log._no_weight_decay = self.D._no_weight_decay = True  # as mamba_ssm: trainers skip them
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self) -> None:
        """Mamba's special initialisation: S4D-real ``A = -(1..N)`` per channel, ``D = 1``, and the
        step projection of ``init_dt_proj``. (Other weights keep PyTorch's defaults.)"""
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        copy_unless_loaded(self.A_log, torch.log(A).expand(self.d_inner, -1))
        copy_unless_loaded(self.D, torch.ones_like(self.D))
        if not any(getattr(p, "_is_hf_initialized", False) for p in (self.dt_proj.weight, self.dt_proj.bias)):
            init_dt_proj(self.dt_proj, self.dt_rank, *self._dt_init)

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int = 0, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """Zero states for ``batch_size`` sequences: conv state (batch, d_inner, d_conv) in
        ``dtype`` (default: the conv weight's) and SSM state (batch, d_inner, d_state) in float32 or
        wider (the scan accumulates in it, whatever the activations' dtype). The SSM needs no
        room per token, so ``max_seqlen`` is unused (kept for mamba_ssm's signature)."""
        device = self.conv1d.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype)
        ssm_dtype = torch.promote_types(self.A_log.dtype, torch.float32)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype)
        return conv_state, ssm_state

    def _ssm_params(self) -> tuple[Tensor, Tensor, Tensor]:
        return -torch.exp(self.A_log.float()), self.D.float(), self.dt_proj.bias.float()

    def forward(
        self,
        hidden_states: Tensor,
        conv_state: Tensor | None = None,
        ssm_state: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """(batch, L, d_model) -> (batch, L, d_model), starting from the zero state.

        With ``conv_state`` and ``ssm_state`` (from ``allocate_inference_cache``) they are
        overwritten in place with the states after the last token, ready for ``step``.
        ``mask`` (batch, L) bool is False at left padding: those positions feed zeros to the conv
        and the scan (before and after the conv, whose bias would otherwise leak into the state),
        so each row's state at its first real token is the zero state, as without the padding.
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise InputError(f"Mamba: expected input (batch, L, {self.d_model}); got {tuple(hidden_states.shape)}")
        seqlen = hidden_states.shape[1]
        # Sequence-major throughout, (batch, L, channels) as in_proj gives and out_proj takes: the
        # conv runs in that layout and the scan reads (batch, channels, L) views of it.
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (batch, L, d_inner) each
        keep = None if mask is None else mask[..., None].to(x.dtype)  # (batch, L, 1)
        if keep is not None:
            x = x * keep
        if conv_state is not None:
            # the last d_conv inputs, left-padded with zeros when the sequence is shorter
            conv_state.copy_(F.pad(x.transpose(1, 2), (self.d_conv - seqlen, 0)))
        # causal; the weights in x's dtype, as conv1d under autocast takes them
        bias = None if self.conv1d.bias is None else self.conv1d.bias.to(x.dtype)
        x = depthwise_conv(x, self.conv1d.weight[:, 0].to(x.dtype), bias, activation="silu")
        if keep is not None:
            x = x * keep
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = low_rank_linear(dt, self.dt_proj.weight)  # its bias goes to the scan
        A, D, dt_bias = self._ssm_params()
        y = selective_scan(
            x.transpose(1, 2),
            delta.transpose(1, 2),
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            D,
            z=z.transpose(1, 2),
            delta_bias=dt_bias,
            delta_softplus=True,
            return_last_state=ssm_state is not None,
        )
        if ssm_state is not None:
            y, last_state = y
            ssm_state.copy_(last_state)
        return self.out_proj(y.transpose(1, 2))

    def step(self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One token: (batch, 1, d_model) -> (batch, 1, d_model); both states are updated in place
        (and returned, as mamba_ssm does)."""
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
            raise InputError(f"Mamba.step: expected one token (batch, 1, d_model); got {tuple(hidden_states.shape)}")
        dtype = hidden_states.dtype
        x, z = self.in_proj(hidden_states.squeeze(1)).chunk(2, dim=-1)  # (batch, d_inner)
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        x = (conv_state * self.conv1d.weight.squeeze(1)).sum(-1)  # depthwise conv, newest input last
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x).to(dtype)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)
        A, D, dt_bias = self._ssm_params()
        y = selective_state_update(ssm_state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state
