"""Parameters and multiply-adds of a model at a given input size, and the parameter accounting
of the ESH LM.

Counted on the meta device (no memory, no arithmetic) with ``torch.utils.flop_counter``,
which sees matmuls and convolutions. Attention is counted from each
``scaled_dot_product_attention`` call's shapes (two batched products, ``L x S x (E + Ev)``
multiply-adds per batch and head), so that no other batched matmul (Vim's input projection)
is taken for attention. The selective scan is elementwise work that the counter does not see;
esh counts it itself from each scan call's shape: per state element and step one exp, and
multiply-adds for the decay, the input and the read-out, the convention (9 FLOPs) of
mamba_ssm's reference FLOP counter.

ESH LM sizes are **total parameters including the token embedding, the tied head counted once
and every expert counted**; ``non_embedding`` leaves out the embedding (and an untied head),
``active`` the experts a token does not visit under top-1 routing.
"""

from __future__ import annotations

import copy
import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from esh.errors import InputError

if TYPE_CHECKING:
    from esh.models.esh_lm import ESHConfig, ESHModel

SCAN_FLOPS_PER_ELEMENT = 9


@dataclass
class ModelInfo:
    name: str
    params: int
    input_size: tuple[int, int, int]
    macs_matmul_conv: float
    macs_attention: float
    flops_scan: float

    @property
    def total_gflops(self) -> float:
        return (2 * (self.macs_matmul_conv + self.macs_attention) + self.flops_scan) / 1e9

    def format(self) -> str:
        c, h, w = self.input_size
        return "\n".join(
            [
                f"{self.name}: {self.params / 1e6:.2f}M parameters, input {c}x{h}x{w}",
                f"  conv + linear    {self.macs_matmul_conv / 1e9:8.2f} GMACs  (the convention of the official tables)",
                f"  attention (SDPA) {self.macs_attention / 1e9:8.2f} GMACs",
                f"  selective scan   {self.flops_scan / 1e9:8.2f} GFLOPs "
                f"({SCAN_FLOPS_PER_ELEMENT} per state element and step)",
                f"  total            {self.total_gflops:8.2f} GFLOPs (2 per multiply-add)",
            ]
        )


def _attention_macs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Multiply-adds of ``softmax(q kᵀ) v`` for (..., L, E) queries, (..., S, E) keys and
    (..., S, Ev) values (the leading dimensions broadcast)."""
    batch = math.prod(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
    return batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def count_model(model: nn.Module, input_size: tuple[int, int, int], name: str = "model") -> ModelInfo:
    """Parameters and operation counts of one forward pass on a single image."""
    params = sum(p.numel() for p in model.parameters())
    scan_flops = [0.0]
    attention_macs = [0]
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(query, key, value, *args, **kwargs):
        # counted from the shapes; the output is empty, so its products are not counted again
        attention_macs[0] += _attention_macs(query, key, value)
        return query.new_empty(*query.shape[:-1], value.shape[-1])

    dispatch = importlib.import_module("esh.ops.selective_scan")  # the package, not the function
    original = dict(dispatch._IMPLS)

    def counting(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        # the shape is all that matters on the meta device: count, and return empty outputs
        scan_flops[0] += SCAN_FLOPS_PER_ELEMENT * u.shape[0] * u.shape[1] * u.shape[2] * A.shape[1]
        out = torch.empty_like(u)
        return (out, u.new_empty(u.shape[0], u.shape[1], A.shape[1])) if return_last_state else out

    # count on a meta copy: the caller's model keeps its weights, device and train/eval mode
    meta = copy.deepcopy(model).to("meta")
    x = torch.empty(1, *input_size, device="meta")
    counter = FlopCounterMode(display=False)
    try:
        for key in dispatch._IMPLS:
            dispatch._IMPLS[key] = counting
        F.scaled_dot_product_attention = counting_sdpa
        with counter, torch.no_grad():
            meta.eval()(x)
    finally:
        dispatch._IMPLS.update(original)
        F.scaled_dot_product_attention = sdpa
    macs_matmul_conv = counter.get_total_flops() / 2
    return ModelInfo(name, params, tuple(input_size), macs_matmul_conv, float(attention_macs[0]), scan_flops[0])


def model_info(name: str, img_size: int | None = None, **kwargs) -> ModelInfo:
    """``esh info NAME``: build the model on the meta device and count it."""
    from esh.models.resolve import build_model

    with torch.device("meta"):  # built for img_size (Vim's position embedding), checked there
        model = build_model(name, img_size=img_size, **kwargs)
    c, h, w = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
    if img_size is not None:
        h = w = img_size
    return count_model(model, (c, h, w), name)


# ---- ESH LM parameter accounting
def esh_lm_param_formula(config: ESHConfig) -> dict[str, int]:
    """Closed-form parameter counts of a Mamba-1 ESH LM (``total``, ``non_embedding``, ``active``).

    Per block: 2 RMSNorms and 2 LayerScales (4d), the alpha router (d + 1), gated attention
    (5d²), the Mamba mixer (6d² + 2d(K + 2R + 3N + 3) at expand 2, in general 3ed² +
    ed(K + 2R + 3N + 3)), the MoE router (dE) and E SwiGLU experts (3Edf); plus 2d for the
    branch norms. Total adds the embedding V·d (and V·d again for an untied head) and the final
    norm d. Active = total minus the (E − 1) experts a token does not use, in every layer.
    """
    if config.ssm_type != "mamba1":
        raise InputError("esh_lm_param_formula covers ssm_type='mamba1' only")
    d, e, n, k, r = config.d_model, config.expand, config.d_state, config.d_conv, config.resolved_dt_rank
    n_exp, f, n_layers, v = config.n_experts, config.expert_hidden, config.n_layers, config.vocab_size
    di = e * d
    mamba = 3 * di * d + di * (k + 2 * r + 3 * n + 3)
    norms = 2 * d + (2 * d if config.layer_scale_init is not None else 0) + (2 * d if config.branch_norm else 0)
    block = norms + (d + 1) + 5 * d * d + mamba + d * n_exp + 3 * n_exp * d * f
    embedding = v * d * (1 if config.tie_embeddings else 2)
    total = embedding + d + n_layers * block
    return {
        "total": total,
        "non_embedding": total - embedding,
        "active": total - n_layers * (n_exp - 1) * 3 * d * f,
    }


def lm_parameters_by_component(model: ESHModel) -> dict[str, int]:
    """Parameters of an ESH LM per component, the tied head counted once (under ``embedding``)."""
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():  # shared (tied) tensors appear once
        if name.startswith("embed_tokens"):
            key = "embedding"
        elif name.startswith("lm_head"):
            key = "lm_head (untied)"
        elif name.startswith("norm."):
            key = "norms + layerscale"
        else:
            sub = name.split(".")[2]
            key = {
                "attn": "attention (gated)",
                "ssm": f"ssm ({model.config.ssm_type})",
                "router": "alpha router",
            }.get(sub, "norms + layerscale")
            if sub == "moe":
                key = "moe router" if ".moe.router." in name else "moe experts"
        parts[key] = parts.get(key, 0) + p.numel()
    return parts


def lm_num_parameters(model: ESHModel) -> dict[str, int]:
    """``total`` (embedding included, tied head once, every expert), ``non_embedding`` (total
    minus the token embedding and an untied head) and ``active`` per token (total minus the
    experts a token does not visit under top-1 routing)."""
    parts = lm_parameters_by_component(model)
    total = sum(parts.values())
    expert = sum(p.numel() for p in model.layers[0].moe.experts[0].parameters()) if len(model.layers) else 0
    inactive = len(model.layers) * (model.config.n_experts - 1) * expert
    embedding = parts.get("embedding", 0) + parts.get("lm_head (untied)", 0)
    return {"total": total, "non_embedding": total - embedding, "active": total - inactive}


def print_lm_size(model: ESHModel) -> dict[str, Any]:
    """Print and return the total, non-embedding and active-per-token counts of an ESH LM and
    its split per component (under ``components``)."""
    counts = lm_num_parameters(model)
    parts = lm_parameters_by_component(model)
    cfg = model.config
    lines = [
        f"ESH LM: d_model={cfg.d_model}, n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, "
        f"experts={cfg.n_experts}x{cfg.expert_hidden}, vocab={cfg.vocab_size}, ssm={cfg.ssm_type}",
        f"  total parameters    {counts['total'] / 1e6:10.2f}M  (embedding included, tied head once, all experts)",
        f"  non-embedding       {counts['non_embedding'] / 1e6:10.2f}M",
        f"  active per token    {counts['active'] / 1e6:10.2f}M  (top-1: one expert per token)",
    ]
    for name, n in sorted(parts.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {name:<20}{n / 1e6:10.2f}M  {100 * n / counts['total']:5.1f}%")
    print("\n".join(lines))
    return {**counts, "components": parts}
