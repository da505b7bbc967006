"""ESH-Vision: the entropy-steered hybrid vision backbone (esh's own design).

Image -> patch embedding (4x4, with each patch's pixel-entropy prior) -> four stages of
``HybridVisionBlock``s with patch merging between them -> LayerNorm, average pool, head. In
every block a router gives each patch a weight α between relative-position window attention
(α) and a bidirectional Mamba over the raster-ordered patches (1 - α); patches with α > θ
ponder with Graves' ACT. ``forward_with_aux`` returns the logits with every block's α map and
the ponder cost; ``auxiliary_losses`` turns the last forward into the training terms (ponder
cost on a warm-up schedule, the α-variance bonus) that esh's trainer adds to the loss.

Routing is soft (the trained blend: both paths for every patch) or hard (each patch one path,
only the selected work is done): ``set_routing``; see ``esh.layers.hybrid_block``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from esh._compat import import_timm
from esh.errors import InputError
from esh.layers.entropy import histogram_entropy, patch_histograms, pool_histograms
from esh.layers.hybrid_block import HybridVisionBlock
from esh.layers.mamba_init import init_dt_proj
from esh.layers.padding import pad_to_multiple
from esh.layers.vssm import BidirectionalVSSM
from esh.models._builder import UnexpectedArgumentError, build_model, call_block, drop_path_rates, vision_cfg
from esh.models._builder import load_checkpoint as load_weights
from esh.models._checkpoint import extract_state_dict, strip_prefix
from esh.models._inputs import check_image_batch, parameter_dtype
from esh.models._scripting import NotScriptable
from esh.models.registry import register_model

_timm = import_timm()
trunc_normal_ = _timm.layers.trunc_normal_
feature_take_indices = _timm.models._features.feature_take_indices

__all__ = [
    "ESHVision",
    "ESHVisionBackbone",
    "ESHVisionConfig",
    "budget_loss",
    "checkpoint_filter_fn",
    "ponder_weight_at",
]


@dataclass
class ESHVisionConfig:
    """Architecture and routing-loss settings. The defaults are ``esh_vision_small``'s
    architecture (24 hybrid blocks (2, 2, 18, 2), dim 96, 1000 classes) with a stochastic-depth
    rate of 0.2; the registered ``esh_vision_small`` trains with ``drop_path_rate=0.3``."""

    img_size: int = 224  # the native input size (pretrained_cfg); any size works
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    patch_size: int = 4
    window_size: int = 7
    mlp_ratio: float = 3.0
    qkv_bias: bool = True
    d_state: int = 8
    ssm_expand: float = 1.0
    d_conv: int = 4
    entropy_bins: int = 16
    router_hidden_ratio: float = 0.25
    ponder_threshold: float = 0.5  # θ: patches with α > θ ponder
    max_ponder_steps: int = 2  # extra ACT steps after the block's own
    halt_eps: float = 0.01
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.2
    layer_scale_init_value: float | None = 1e-2
    global_pool: str = "avg"
    # training terms (auxiliary_losses)
    ponder_weight: float = 0.01  # λ_ponder after the ramp
    ponder_warmup_steps: int = 15000  # λ_ponder = 0 before this optimizer step
    ponder_ramp_steps: int = 5000  # then linear to ponder_weight over this many steps
    alpha_var_weight: float = 0.1  # λ_var: loss_alpha_var = -λ_var · Var(α)
    routing_budget: float | None = None  # F: loss_budget pulls each block's mean α towards F
    routing_budget_weight: float = 1.0  # λ_budget: loss_budget = λ_budget · mean_b (mean α_b - F)²


def ponder_weight_at(step: int, weight: float, warmup_steps: int, ramp_steps: int) -> float:
    """λ_ponder at an optimizer step: 0 up to ``warmup_steps``, then linear to ``weight`` over
    ``ramp_steps`` (a step function when ``ramp_steps`` is 0), then ``weight``."""
    if step < warmup_steps:
        return 0.0
    if ramp_steps <= 0:
        return float(weight)
    return float(weight) * min(1.0, (step - warmup_steps) / ramp_steps)


def budget_loss(alphas: Sequence[Tensor], target: float, weight: float) -> Tensor:
    """The routing-budget term: ``weight`` · the mean over blocks of (mean α of the block - target)².

    Hard routing at an attention fraction keeps the top share of each block's patches, so each
    block's mean α (not only the mean over all blocks) is pulled towards the fraction."""
    means = torch.stack([a.float().mean() for a in alphas])
    return weight * (means - target).pow(2).mean()


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch`` x ``patch`` conv, then LayerNorm; the image is zero-padded right
    and bottom to whole patches. (B, C, H, W) -> (B, H/p, W/p, dim)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(pad_to_multiple(x, self.patch_size)).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Swin's 2x2 merge: concatenate each 2x2 group (zero-padding odd sizes), LayerNorm, linear
    4·dim -> dim_out. (B, H, W, dim) -> (B, ceil(H/2), ceil(W/2), dim_out)."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, dim_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = pad_to_multiple(x, 2, channels_last=True)
        B, H, W, C = x.shape
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class ESHVisionStage(nn.Module):
    """Patch merging (all stages but the first), then hybrid blocks. Carries the per-patch grey
    histograms alongside the tokens, so each block's router sees its receptive patch's entropy."""

    def __init__(self, dim_in: int, dim: int, depth: int, downsample: bool, drop_path: Sequence[float], **block_kw):
        super().__init__()
        self.downsample = PatchMerging(dim_in, dim) if downsample else None
        self.blocks = nn.ModuleList(HybridVisionBlock(dim, drop_path=drop_path[i], **block_kw) for i in range(depth))
        self.grad_checkpointing = False

    def forward(self, x: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor, Tensor]]]:
        """x (B, H, W, C), counts (B, H, W, bins) -> x, counts at this stage's grid, and
        (α, ponder cost, attention fraction) per block."""
        if self.downsample is not None:
            x, counts = self.downsample(x), pool_histograms(counts)
        entropy = histogram_entropy(counts)
        aux = []
        for blk in self.blocks:
            x, alpha, cost, attn = call_block(blk, x, entropy, checkpointing=self.grad_checkpointing)
            aux.append((alpha, cost, attn))
        return x, counts, aux


class ESHVision(NotScriptable, nn.Module):
    """The ESH-Vision network with the timm model surface (``model(x)`` returns logits).

    Build it from an ``ESHVisionConfig`` and/or keyword overrides of its fields:
    ``ESHVision(ESHVisionConfig(depths=(2, 2, 6, 2)), num_classes=10)``.
    """

    # esh's trainer turns on block-level gradient checkpointing for models that say so
    default_grad_checkpointing = True

    @classmethod
    def accepted_args(cls) -> set[str]:
        """The keyword arguments the constructor takes: ``config`` and its fields."""
        return {"config"} | {f.name for f in dataclasses.fields(ESHVisionConfig)}

    def __init__(self, config: ESHVisionConfig | None = None, **overrides):
        super().__init__()
        config = config or ESHVisionConfig()
        for name in ("pretrained_cfg", "pretrained_cfg_overlay", "scriptable", "exportable"):
            overrides.pop(name, None)
        known = {f.name for f in dataclasses.fields(ESHVisionConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UnexpectedArgumentError(
                f"ESHVision got unexpected arguments {unknown}; ESHVisionConfig fields are {sorted(known)}"
            )
        cfg = self.config = dataclasses.replace(config, **overrides)
        cfg.depths, cfg.num_heads = tuple(cfg.depths), tuple(cfg.num_heads)
        if len(cfg.depths) != len(cfg.num_heads) or not cfg.depths or min(cfg.depths) < 1:
            raise InputError(f"depths {cfg.depths} and num_heads {cfg.num_heads}: one positive depth per stage")
        if cfg.global_pool not in ("avg", ""):
            raise InputError(f"global_pool must be 'avg' or '' (no pooling); got {cfg.global_pool!r}")
        self.in_chans, self.num_classes, self.global_pool = cfg.in_chans, cfg.num_classes, cfg.global_pool
        dims = [int(cfg.embed_dim * 2**i) for i in range(len(cfg.depths))]
        self.num_features = self.head_hidden_size = dims[-1]
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(cfg.in_chans, dims[0], cfg.patch_size)
        dpr = drop_path_rates(cfg.drop_path_rate, cfg.depths)
        block_kw = dict(
            window_size=cfg.window_size,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            d_state=cfg.d_state,
            ssm_expand=cfg.ssm_expand,
            d_conv=cfg.d_conv,
            router_hidden_ratio=cfg.router_hidden_ratio,
            ponder_threshold=cfg.ponder_threshold,
            max_ponder_steps=cfg.max_ponder_steps,
            halt_eps=cfg.halt_eps,
            drop=cfg.drop_rate,
            attn_drop=cfg.attn_drop_rate,
            layer_scale_init_value=cfg.layer_scale_init_value,
        )
        self.stages = nn.ModuleList()
        self.feature_info = []
        self.block_stage: list[int] = []
        for i, depth in enumerate(cfg.depths):
            self.stages.append(
                ESHVisionStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depth,
                    downsample=i > 0,
                    drop_path=dpr[i],
                    num_heads=cfg.num_heads[i],
                    **block_kw,
                )
            )
            self.block_stage += [i] * depth
            self.feature_info.append(dict(num_chs=dims[i], reduction=cfg.patch_size * 2**i, module=f"stages.{i}"))
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._last_aux: dict | None = None
        self.init_weights()

    def init_weights(self) -> None:
        """trunc-normal(0.02) linears with zero bias, unit LayerNorms, trunc-normal(0.02) bias
        tables; then Mamba's dt init, the router's entropy prior and the ACT halting bias."""

        def generic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(generic)
        for m in self.modules():
            if isinstance(m, BidirectionalVSSM):
                init_dt_proj(m.dt_proj, m.dt_rank)
                init_dt_proj(m.dt_proj_b, m.dt_rank)
            elif hasattr(m, "relative_position_bias_table"):
                trunc_normal_(m.relative_position_bias_table, std=0.02)
            elif hasattr(m, "init_weights") and m is not self:
                m.init_weights()

    # --- routing ----------------------------------------------------------------------
    def set_routing(
        self,
        mode: str = "soft",
        attention_fraction: float | None = None,
        threshold: float = 0.5,
        force_alpha: float | None = None,
        exclusive: bool = False,
    ) -> ESHVision:
        """Choose how patches are routed, in every block.

        * ``"soft"`` (default, training): both paths on every patch, blended by α.
        * ``"hard"``: attention (and pondering) only for the selected patches, those with
          α > ``threshold`` or, with ``attention_fraction``, the top ``round(fraction · H · W)``
          patches of each image by α (a fixed budget); no attention work for the others. The
          SSM still scans every patch (the sequence it was trained on); a selected patch keeps
          its blend α · Attn + (1 - α) · SSM, the others take the SSM alone.
          ``exclusive=True`` gives each patch exactly one path instead (the SSM scans only the
          unselected patches). See ``esh.layers.hybrid_block`` for what runs where.

        ``force_alpha`` replaces the router's output by a constant (ablations: 0.0 = SSM only,
        1.0 = attention only). Returns the model.
        """
        for blk in self.blocks():
            blk.set_routing(mode, attention_fraction, threshold, force_alpha, exclusive)
        return self

    @property
    def routing(self) -> str:
        return next(self.blocks()).routing

    def blocks(self):
        """The hybrid blocks in order (24 for the default configuration)."""
        for stage in self.stages:
            yield from stage.blocks

    # --- the timm model surface -------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n or "entropy_weight" in n}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = self.config.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise InputError(f"global_pool must be 'avg' or '' (no pooling); got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def check_input(self, x: Tensor) -> Tensor:
        return check_image_batch(x, self.in_chans, "ESH-Vision", parameter_dtype(self.patch_embed))

    def _run(self, x: Tensor, stop_after: int | None = None):
        """Stem and stages; yields (stage index, NHWC map) and records the routing statistics."""
        x = self.check_input(x)
        counts = patch_histograms(x, self.config.patch_size, self.config.entropy_bins)
        x = self.patch_embed(x)
        aux = []
        for i, stage in enumerate(self.stages):
            x, counts, stats = stage(x, counts)
            aux += stats
            yield i, x
            if stop_after is not None and i >= stop_after:
                break
        if isinstance(x, torch.fx.Proxy):  # torch.fx tracing: no statistics to keep
            return
        self._last_aux = {
            "alphas": [a for a, _, _ in aux],
            "ponder_costs": [p for _, p, _ in aux],
            "attn_fractions": [f for _, _, f in aux],
        }

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (strides 4, 8, 16, 32); ``norm`` applies the final LayerNorm to the
        last stage's map. The final features are NCHW like ``forward_features``."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise InputError(f"output_fmt must be 'NCHW' or 'NHWC'; got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        intermediates = []
        for i, feat in self._run(x, stop_after=max_index if stop_early or intermediates_only else None):
            if i in take_indices:
                if norm and i == last:
                    feat = self.norm(feat)
                intermediates.append(feat if output_fmt == "NHWC" else feat.permute(0, 3, 1, 2))
            x = feat
        if intermediates_only:
            return intermediates
        # the final norm is sized for the last stage: a stop_early run ending before it
        # returns the last map it made, unnormalised
        return (self.norm(x) if i == last else x).permute(0, 3, 1, 2), intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head=True):
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        if max_index < len(self.stages) - 1:
            self.stages = self.stages[: max_index + 1]
            self.block_stage = [s for s in self.block_stage if s <= max_index]
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.norm = nn.LayerNorm(self.num_features)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> the final normalised map (B, num_features, ⌈H/32⌉, ⌈W/32⌉)."""
        for _, feat in self._run(x):
            x = feat
        return self.norm(x).permute(0, 3, 1, 2)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_with_aux(self, x: Tensor) -> dict:
        """Logits and routing of one forward.

        Returns a dict: ``logits`` (B, num_classes); ``alphas`` one (B, H_b, W_b) map in [0, 1]
        per block at that block's token grid; ``ponder_cost`` a scalar, the mean over blocks of
        each block's mean N + R over its patches (2 where nothing ponders); ``block_stage`` the
        stage index of each block.
        """
        logits = self.forward_head(self.forward_features(x))
        aux = self._last_aux
        return {
            "logits": logits,
            "alphas": aux["alphas"],
            "ponder_cost": torch.stack(aux["ponder_costs"]).mean(),
            "block_stage": list(self.block_stage),
        }

    _ROUTING_TERMS = (
        "ponder_weight",
        "ponder_warmup_steps",
        "ponder_ramp_steps",
        "alpha_var_weight",
        "routing_budget",
        "routing_budget_weight",
    )

    def set_routing_terms(self, **terms) -> ESHVision:
        """Set the training terms' settings (any of ``ponder_weight``, ``ponder_warmup_steps``,
        ``ponder_ramp_steps``, ``alpha_var_weight``, ``routing_budget``,
        ``routing_budget_weight``) in the model's config, which checkpoints keep. Returns the model."""
        unknown = sorted(set(terms) - set(self._ROUTING_TERMS))
        if unknown:
            raise InputError(f"unknown routing terms {unknown}; known: {', '.join(self._ROUTING_TERMS)}")
        for name, value in terms.items():
            if name == "routing_budget" and value is not None and not 0.0 <= float(value) <= 1.0:
                raise InputError(f"routing_budget is an attention fraction in [0, 1]; got {value!r}")
            if name != "routing_budget" and (value is None or float(value) < 0):
                raise InputError(f"{name} must be a number >= 0; got {value!r}")
        self.config = dataclasses.replace(self.config, **terms)
        return self

    def auxiliary_losses(self, step: int) -> dict[str, Tensor | float]:
        """The routing terms of the last forward, for esh's trainer.

        ``loss_ponder`` = λ_ponder(step) · ponder cost (``ponder_weight_at``) and
        ``loss_alpha_var`` = -alpha_var_weight · Var(α) over every patch of every block of the
        batch, both tensors to add to the objective; and logged floats: ``alpha_mean``,
        ``alpha_var``, ``attn_fraction`` (share of patches with α > 0.5, or routed to attention
        in hard mode), ``ponder_cost`` and ``ponder_weight``. With a ``routing_budget`` F,
        also ``loss_budget`` (``budget_loss``: routing_budget_weight · mean over blocks of
        (mean α - F)²).
        """
        if self._last_aux is None:
            raise RuntimeError("auxiliary_losses needs a forward pass first: call the model on a batch")
        cfg = self.config
        alphas = torch.cat([a.reshape(-1) for a in self._last_aux["alphas"]]).float()
        var = alphas.var(unbiased=False)
        ponder = torch.stack(self._last_aux["ponder_costs"]).mean()
        lam = ponder_weight_at(step, cfg.ponder_weight, cfg.ponder_warmup_steps, cfg.ponder_ramp_steps)
        terms = {
            "loss_ponder": lam * ponder,
            "loss_alpha_var": -cfg.alpha_var_weight * var,
            "alpha_mean": float(alphas.detach().mean()),
            "alpha_var": float(var.detach()),
            "attn_fraction": float(torch.stack(self._last_aux["attn_fractions"]).mean()),
            "ponder_cost": float(ponder.detach()),
            "ponder_weight": lam,
        }
        if cfg.routing_budget is not None:
            terms["loss_budget"] = budget_loss(self._last_aux["alphas"], cfg.routing_budget, cfg.routing_budget_weight)
        return terms


class ESHVisionBackbone(ESHVision):
    """The same network with a dict for output: ``ESHVisionBackbone(ESHVisionConfig())(x)``
    returns ``{"features": logits, "ponder_cost": scalar, "alphas": [per-block α maps]}``.
    Its state dict is the registered models' (``esh_vision_small`` for the default config)."""

    def forward(self, x: Tensor) -> dict:
        out = self.forward_with_aux(x)
        return {"features": out["logits"], "ponder_cost": out["ponder_cost"], "alphas": out["alphas"]}


def checkpoint_filter_fn(state_dict: dict, model: ESHVision) -> dict[str, Tensor]:
    """esh's own checkpoints (a state dict, or one under ``state_dict``/``model``/``ema``
    written by ``esh train``), with DDP's ``module.`` prefix removed."""
    state = extract_state_dict(state_dict, keys=("state_dict", "model"))
    return strip_prefix(state, "module.")


def load_checkpoint(
    model: ESHVision, path: str | os.PathLike, variant: str = "ESH-Vision", ignore_classifier: bool = False
) -> None:
    """Load an esh checkpoint into ``model`` (``esh.models._builder.load_checkpoint``)."""
    load_weights(model, path, ignore_classifier=ignore_classifier, what=variant)


def _cfg(**kwargs) -> dict:
    return vision_cfg(
        **{
            "pool_size": (7, 7),
            "crop_pct": 0.9,
            "first_conv": "patch_embed.proj",
            "license": "esh configuration, no released weights",
            **kwargs,
        }
    )


default_cfgs = _timm.models.generate_default_cfgs(
    {
        "esh_vision_nano": _cfg(input_size=(3, 56, 56), pool_size=(2, 2)),
        "esh_vision_tiny": _cfg(),
        "esh_vision_small": _cfg(),
        "esh_vision_base": _cfg(),
    }
)

_ARCHS: dict[str, dict] = {
    # CPU-sized, the size of mambavision_nano, for the embedded 56x56 digits
    "esh_vision_nano": dict(embed_dim=32, depths=(1, 1, 2, 2), num_heads=(1, 2, 4, 8), img_size=56, drop_path_rate=0.0),
    "esh_vision_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "esh_vision_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "esh_vision_base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
}


def _create_esh_vision(
    variant: str, pretrained: bool = False, checkpoint_path: str | None = None, **kwargs
) -> nn.Module:
    return build_model(
        ESHVision,
        variant,
        pretrained,
        checkpoint_path,
        checkpoint_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3)),
        **{**_ARCHS[variant], **kwargs},
    )


@register_model(timm=True)
def esh_vision_nano(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> ESHVision:
    """ESH-Vision nano: dim 32, depths (1, 1, 2, 2), 56x56 input; the CPU-sized model."""
    return _create_esh_vision("esh_vision_nano", pretrained, checkpoint_path, **kwargs)


@register_model(timm=True)
def esh_vision_tiny(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> ESHVision:
    """ESH-Vision tiny: dim 96, depths (2, 2, 6, 2), Swin-T / MambaVision-T sized."""
    return _create_esh_vision("esh_vision_tiny", pretrained, checkpoint_path, **kwargs)


@register_model(timm=True)
def esh_vision_small(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> ESHVision:
    """ESH-Vision small: dim 96, depths (2, 2, 18, 2) (24 blocks, the default ESHVisionConfig)."""
    return _create_esh_vision("esh_vision_small", pretrained, checkpoint_path, **kwargs)


@register_model(timm=True)
def esh_vision_base(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> ESHVision:
    """ESH-Vision base: dim 128, depths (2, 2, 18, 2), Swin-B / MambaVision-B sized."""
    return _create_esh_vision("esh_vision_base", pretrained, checkpoint_path, **kwargs)
