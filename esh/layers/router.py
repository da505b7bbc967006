"""Routers: a mixing weight α between attention (α) and the SSM (1 - α), per patch (ESH-Vision)
or per token (ESH LM)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SpatialSoftEntropyRouter", "TokenRouter"]


class SpatialSoftEntropyRouter(nn.Module):
    """α = sigmoid(MLP(token) + w · entropy): a small MLP on the normalised token plus a learned
    weight ``w`` on the patch's pixel-entropy prior (``esh.layers.entropy``).

    ``w`` starts at ``entropy_weight`` and the output bias at ``bias``, so at initialisation
    α = sigmoid(2 · entropy - 1): flat patches lean to the SSM, busy ones to attention.
    """

    def __init__(
        self,
        dim: int,
        hidden_ratio: float = 0.25,
        entropy_weight: float = 2.0,
        bias: float = -1.0,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        hidden = max(1, int(dim * hidden_ratio))
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, 1)
        self.entropy_weight = nn.Parameter(torch.tensor(float(entropy_weight)))
        self._init = (entropy_weight, bias)
        self.init_weights()

    def init_weights(self) -> None:
        """The entropy weight and output bias (called again after a model-wide init)."""
        with torch.no_grad():
            self.entropy_weight.fill_(self._init[0])
            self.fc2.bias.fill_(self._init[1])

    def forward(self, x: Tensor, entropy: Tensor) -> Tensor:
        """x: (..., dim) normalised tokens, entropy: (...) in [0, 1] -> α: (...) in [0, 1]."""
        logit = self.fc2(self.act(self.fc1(x))).squeeze(-1) + self.entropy_weight * entropy.to(x.dtype)
        return torch.sigmoid(logit)


class TokenRouter(nn.Module):
    """ESH LM's per-token α = sigmoid(w · x + b), computed in float32 (selective precision, as
    Switch routers do), so bf16 autocast cannot flip a token's routing. ``d + 1`` parameters."""

    def __init__(self, dim: int, bias: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        with torch.no_grad():
            nn.init.zeros_(self.proj.weight)
            self.proj.bias.fill_(bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) normalised tokens -> α: (...) float32 in [0, 1]."""
        with torch.autocast(x.device.type, enabled=False):
            logit = nn.functional.linear(x.float(), self.proj.weight.float(), self.proj.bias.float())
        return torch.sigmoid(logit.squeeze(-1))
