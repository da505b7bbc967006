"""Adaptive Computation Time (Graves, 2016, arXiv 1603.08983) for a set of tokens.

Each token runs a transition ``step`` repeatedly. After step n its halting unit gives
h_n = sigmoid(w · s_n + b). The token halts at N = the first n with h_1 + ... + h_n >= 1 - eps
(or at ``max_steps``); its remainder is R = 1 - (h_1 + ... + h_{N-1}); its output is
sum_n p_n s_n with p_n = h_n for n < N and p_N = R; its ponder cost is N + R. A token that
halts after its first step therefore has N = 1, R = 1, cost 2, and output s_1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from esh.errors import InputError

__all__ = ["AdaptiveComputationTime"]


class AdaptiveComputationTime(nn.Module):
    """Graves' halting unit and ponder loop.

    Args:
        dim: token width.
        max_steps: the most steps a token may take, its first included (1 = no pondering).
        eps: Graves' epsilon (halt once the halting sum reaches 1 - eps).
        halt_bias: initial bias of the halting unit; sigmoid(1) = 0.73, so at initialisation a
            token takes a second step and then halts (as Graves recommends, short ponder times
            to begin with).
    """

    def __init__(self, dim: int, max_steps: int = 3, eps: float = 0.01, halt_bias: float = 1.0):
        super().__init__()
        if max_steps < 1:
            raise InputError(f"ACT max_steps counts the first step and must be >= 1; got {max_steps}")
        self.max_steps, self.eps, self._halt_bias = max_steps, eps, halt_bias
        self.halt = nn.Linear(dim, 1)
        self.init_weights()

    def init_weights(self) -> None:
        with torch.no_grad():
            self.halt.bias.fill_(self._halt_bias)

    def halting_probability(self, state: Tensor) -> Tensor:
        """(M, dim) -> (M,) h in (0, 1)."""
        return torch.sigmoid(self.halt(state)).squeeze(-1)

    def forward(self, state: Tensor, step: Callable[[Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Ponder.

        Args:
            state: (M, dim) each token's state after its first step.
            step: ``step(states, running)`` -> next states, for the (m, dim) states of the tokens
                still running; ``running`` (m,) are their indices into ``state``.
        Returns:
            output (M, dim) the halting-weighted mean of each token's states, steps (M,) N
            (integer-valued float) and ponder (M,) N + R.
        """
        M = state.shape[0]
        h = self.halting_probability(state)
        halted = h >= 1 - self.eps
        if self.max_steps == 1:
            halted = torch.ones_like(halted)
        p = torch.where(halted, torch.ones_like(h), h)
        out = p.unsqueeze(-1) * state
        remainder = torch.where(halted, torch.ones_like(h), torch.zeros_like(h))
        steps = torch.ones(M, device=state.device, dtype=state.dtype)
        if self.max_steps == 1:
            return out, steps, steps + remainder
        cum = h.masked_fill(halted, 0.0)  # halting sum of the running tokens
        # Only the running tokens take a step: that is ACT's saving, and it needs their number on
        # the host (nonzero / boolean indexing: one device sync per ponder step on a GPU).
        running = (~halted).nonzero().squeeze(1)
        for n in range(2, self.max_steps + 1):
            if running.numel() == 0:
                break
            new = step(state.index_select(0, running), running)
            state = state.index_copy(0, running, new)
            before = cum[running]
            if n == self.max_steps:
                done = torch.ones_like(before, dtype=torch.bool)
                h_n = torch.zeros_like(before)
            else:
                h_n = self.halting_probability(new)
                done = before + h_n >= 1 - self.eps
            r = 1 - before
            p_n = torch.where(done, r, h_n)
            out = out.index_add(0, running, p_n.unsqueeze(-1) * new)
            remainder = remainder.index_add(0, running, torch.where(done, r, torch.zeros_like(r)))
            steps = steps.index_fill(0, running, float(n))
            cum = cum.index_add(0, running, torch.where(done, torch.zeros_like(h_n), h_n))
            if n < self.max_steps:
                running = running[~done]
        return out, steps, steps + remainder
