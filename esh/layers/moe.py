"""Top-1 (Switch) mixture of SwiGLU experts, dropless by default.

Routing follows Switch Transformer (Fedus et al., 2022): router logits in float32, ``p =
softmax(logits)``, each token goes to ``argmax p`` and the expert's output is multiplied by that
probability (which is what gives the router a gradient). The layer returns, beside its output,
the load-balancing loss ``N · Σ_i f_i · P_i`` (``f_i`` the fraction of tokens dispatched to
expert i, ``P_i`` the mean router probability of expert i; 1 for uniform routing, N when all
tokens go to one expert with probability 1) and the ST-MoE router z-loss ``mean(logsumexp(logits)²)``,
both *unweighted*: the model applies the coefficients.

Without ``capacity_factor`` no token is dropped: tokens are sorted by expert and each expert
runs once on its group. With it, each expert takes at most ``ceil(capacity_factor · T / E)`` of
the T tokens, first come first served in (batch, position) order; the overflow gets a zero
output (it continues on the residual path) and the dropped fraction is reported.

Two ways to run the experts give the same result (``dispatch``):

* ``"grouped"``: tokens sorted by expert, each expert runs once on exactly its own tokens. The
  group sizes are read on the host, which on a GPU waits for the device (one sync per layer).
* ``"padded"``: each expert runs on a slab of fixed size, its tokens in their order then zero
  rows: every shape is known in advance, so nothing waits for the device (and the layer can be
  captured in a CUDA graph). The slab holds ``ceil(capacity_factor · T / E)`` rows, all T
  tokens when dropless: dropless, every expert then does the work of all tokens.

``"auto"`` (the default) is padded on CUDA and grouped elsewhere: on a CPU a sync costs nothing
and padding only adds work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esh.errors import InputError

__all__ = ["MoEAux", "SwiGLU", "SwitchMoE"]

DISPATCH_MODES = ("auto", "grouped", "padded")


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``, no biases (Mixtral's expert names)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclass
class MoEAux:
    """What a ``SwitchMoE`` forward reports besides its output (all float32 scalars unless noted).

    load_balance_loss: ``N · Σ f_i P_i`` over the tokens of the call (differentiable through P).
    z_loss: ``mean over tokens of logsumexp(router logits)²`` (differentiable).
    dropped_fraction: share of tokens that got no expert (0 when dropless; no gradient).
    expert_fraction: (N,) ``f_i``, the share of tokens each expert was chosen for (no gradient).
    """

    load_balance_loss: Tensor
    z_loss: Tensor
    dropped_fraction: Tensor
    expert_fraction: Tensor


def _token_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """Mean over the token dimension (0), or the sum weighted by ``weight`` (tokens,) = real-token mask / count."""
    if weight is None:
        return values.mean(0)
    return (values * weight.view(-1, *([1] * (values.dim() - 1)))).sum(0)


def _capacity(capacity_factor: float, n_tokens: int | Tensor, n_exp: int) -> int | Tensor:
    """``ceil(capacity_factor · n_tokens / n_exp)``; a tensor count stays on its device (same
    float64 arithmetic as Python's)."""
    if isinstance(n_tokens, Tensor):
        return torch.ceil(n_tokens.double() * capacity_factor / n_exp)
    return math.ceil(capacity_factor * n_tokens / n_exp)


class SwitchMoE(nn.Module):
    def __init__(
        self,
        d_model: int,
        hidden: int,
        n_experts: int = 4,
        capacity_factor: float | None = None,
        router_jitter: float = 0.0,
        router_init_scale: float = 0.1,
        dispatch: str = "auto",
    ):
        super().__init__()
        if n_experts < 1 or hidden < 1:
            raise InputError(f"SwitchMoE: n_experts and hidden must be >= 1; got {n_experts}, {hidden}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise InputError(f"SwitchMoE: capacity_factor must be > 0 or None (dropless); got {capacity_factor}")
        if dispatch not in DISPATCH_MODES:
            raise InputError(f"SwitchMoE: dispatch must be one of {DISPATCH_MODES}; got {dispatch!r}")
        self.d_model, self.hidden, self.n_experts = d_model, hidden, n_experts
        self.capacity_factor = capacity_factor
        self.router_jitter = router_jitter
        self.router_init_scale = router_init_scale
        self.dispatch = dispatch
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, hidden) for _ in range(n_experts))
        self.reset_router()

    def reset_router(self) -> None:
        """Switch's small router init: truncated normal with std sqrt(s / d_model), s = 0.1."""
        std = math.sqrt(self.router_init_scale / self.d_model)
        nn.init.trunc_normal_(self.router.weight, std=std, a=-2 * std, b=2 * std)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Router logits and probabilities (tokens, N) in float32 for ``x`` (tokens, d_model)."""
        x = x.float()
        if self.training and self.router_jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
        logits = F.linear(x, self.router.weight.float())
        return logits, logits.softmax(dim=-1)

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> tuple[Tensor, MoEAux]:
        """(..., d_model) -> (..., d_model) and the ``MoEAux`` of these tokens.

        ``token_mask`` (``x.shape[:-1]``, bool) marks the real tokens of a padded batch: the others
        get no expert (zero output), take no capacity and are left out of every statistic and loss.
        """
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        n_tokens, n_exp = x.shape[0], self.n_experts
        padded = self.dispatch == "padded" or (self.dispatch == "auto" and x.is_cuda)
        logits, probs = self.route(x)
        gate, expert = probs.max(dim=-1)
        real = weight = None
        if token_mask is not None:
            if token_mask.shape != shape[:-1]:
                raise InputError(f"SwitchMoE: token_mask must be {tuple(shape[:-1])}; got {tuple(token_mask.shape)}")
            real = token_mask.reshape(-1).to(torch.bool)
            if padded:  # the count stays on the device
                n_tokens = real.sum()
                weight = real.float() / n_tokens.clamp(min=1)
            else:
                n_tokens = int(real.sum())
                weight = real.float() / max(n_tokens, 1)

        with torch.no_grad():
            dispatch = (expert[:, None] == torch.arange(n_exp, device=x.device)).float()
            if real is not None:
                dispatch = dispatch * real[:, None]
            expert_fraction = _token_mean(dispatch, weight)
            if self.capacity_factor is None:
                keep = real
                dropped = torch.zeros((), device=x.device)
            else:
                capacity = _capacity(self.capacity_factor, n_tokens, n_exp)
                rank_in_expert = (dispatch.cumsum(0) * dispatch).sum(-1) - 1  # 0 for an expert's first token
                keep = rank_in_expert < capacity
                if real is not None:
                    keep &= real
                dropped = 1.0 - _token_mean(keep.float(), weight)
        load_balance = n_exp * (expert_fraction * _token_mean(probs, weight)).sum()
        z_loss = _token_mean(torch.logsumexp(logits, dim=-1).pow(2), weight)

        run = self._run_padded if padded else self._run_grouped
        y = run(x, expert, keep, gate)
        aux = MoEAux(load_balance, z_loss, dropped, expert_fraction)
        return y.reshape(shape[:-1] + (y.shape[-1],)), aux

    def _run_grouped(self, x: Tensor, expert: Tensor, keep: Tensor | None, gate: Tensor) -> Tensor:
        """Each expert once on exactly its kept tokens (the group sizes are read on the host)."""
        n_exp = self.n_experts
        # group the tokens by expert (dropped ones get the id n_exp and sort last), run each expert once
        target = expert if keep is None else torch.where(keep, expert, n_exp)
        order = torch.argsort(target, stable=True)
        counts = torch.bincount(target, minlength=n_exp + 1)[:n_exp].tolist()
        n_kept = sum(counts)
        order = order[:n_kept]
        groups = x.index_select(0, order).split(counts)  # (index_select: its backward is one index_add)
        # every expert runs, an idle one on zero tokens: all parameters stay in the graph (zero
        # gradients), so DDP and FSDP see the same gradients on every rank
        outs = [self.experts[e](g) for e, g in enumerate(groups)]
        out = torch.cat(outs) * gate.index_select(0, order)[:, None].to(outs[0].dtype)
        return x.new_zeros(x.shape, dtype=out.dtype).index_add(0, order, out)

    def _run_padded(self, x: Tensor, expert: Tensor, keep: Tensor | None, gate: Tensor) -> Tensor:
        """Each expert on a fixed-size slab: its kept tokens in order, then zero rows. No shape
        depends on the routing, so nothing is read on the host."""
        n_tokens, n_exp = x.shape[0], self.n_experts
        slab = n_tokens
        if self.capacity_factor is not None:  # no expert keeps more (capacity counts real tokens only)
            slab = min(n_tokens, _capacity(self.capacity_factor, n_tokens, n_exp))
        with torch.no_grad():
            kept = torch.ones_like(expert, dtype=torch.bool) if keep is None else keep
            member = (expert[:, None] == torch.arange(n_exp, device=x.device)) & kept[:, None]
            rank = (member.long().cumsum(0) * member).sum(-1) - 1
            # slot of each token in the (E * slab) rows; dropped tokens read the spare zero row
            spare = n_exp * slab
            slot = torch.where(kept, expert * slab + rank, spare)
            source = torch.full((spare + 1,), n_tokens, dtype=torch.long, device=x.device)
            source.scatter_(0, slot, torch.arange(n_tokens, device=x.device))  # row spare: anything
        rows = torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, source[:spare]).view(n_exp, slab, x.shape[1])
        # every expert runs (on zero rows when idle): all parameters stay in the graph, as grouped
        out = torch.cat([self.experts[e](rows[e]) for e in range(n_exp)])
        out = torch.cat([out, out.new_zeros(1, out.shape[1])])
        return out.index_select(0, slot) * (gate * kept).to(out.dtype)[:, None]
