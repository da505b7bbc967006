"""MambaVision (Hatamizadeh & Kautz, NVIDIA, CVPR 2025; arXiv 2407.08083).

A four-stage hierarchical backbone: a convolutional stem and two stages of residual conv
blocks at high resolution, then two stages that run, inside non-overlapping windows, first
MambaVisionMixer blocks and then self-attention blocks. Built to the official code
(NVlabs/MambaVision, PyPI ``mambavision`` 1.2.0) with its parameter names, so the released
``.pth.tar`` files and the hub's ``model.safetensors`` load unchanged; the selective scan is
``esh.ops.selective_scan`` (no mamba-ssm, any device).
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from esh._compat import import_timm
from esh.errors import InputError
from esh.layers import Attention, MambaVisionMixer
from esh.layers.padding import crop_to, pad_to_multiple
from esh.models._builder import (
    UnexpectedArgumentError,
    build_model,
    call_block,
    drop_path_rates,
    vision_cfg,
)
from esh.models._builder import load_checkpoint as load_weights
from esh.models._checkpoint import extract_state_dict, strip_prefix
from esh.models._inputs import check_image_batch, parameter_dtype
from esh.models._scripting import NotScriptable
from esh.models.registry import register_model

_timm = import_timm()
DropPath = _timm.layers.DropPath
Mlp = _timm.layers.Mlp
trunc_normal_ = _timm.layers.trunc_normal_
feature_take_indices = _timm.models._features.feature_take_indices

__all__ = ["MambaVision", "checkpoint_filter_fn"]


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, C, H, W) with H, W multiples of ``window`` -> (B * nH * nW, window², C), windows in
    (batch, row, column) order and tokens in raster order inside a window."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // window, window, W // window, window)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window * window, C)


def window_reverse(windows: Tensor, window: int, H: int, W: int) -> Tensor:
    """Inverse of ``window_partition``: -> (B, C, H, W)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window, W // window, window, window, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, C, H, W)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 convs with BatchNorm (eps 1e-4) and ReLU: 4x downsampling."""

    def __init__(self, in_chans: int = 3, in_dim: int = 64, dim: int = 96):
        super().__init__()
        self.proj = nn.Identity()
        self.conv_down = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(in_dim, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False),
            nn.BatchNorm2d(dim, eps=1e-4),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_down(self.proj(x))


class ConvBlock(nn.Module):
    """x + BN(conv(GELU_tanh(BN(conv(x))))), the blocks of stages 1 and 2."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale: float | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, 3, 1, 1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)


class Block(nn.Module):
    """Pre-norm residual block whose token mixer is MambaVisionMixer or attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        use_attention: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if use_attention:
            self.mixer = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        else:
            self.mixer = MambaVisionMixer(d_model=dim, d_state=8, d_conv=3, expand=1)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        if layer_scale is not None:
            self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: Tensor) -> Tensor:
        y = self.mixer(self.norm1(x))
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


class Downsample(nn.Module):
    def __init__(self, dim: int, dim_out: int | None = None):
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(dim, dim_out or 2 * dim, 3, 2, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(x)


class MambaVisionLayer(nn.Module):
    """One stage (``levels.i``): its blocks, then the downsampling conv (stages 1-3)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        conv: bool,
        downsample: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        layer_scale: float | None = None,
        layer_scale_conv: float | None = None,
    ):
        super().__init__()
        self.conv = conv
        self.window_size = window_size
        self.grad_checkpointing = False
        drop_path = list(drop_path) or [0.0] * depth
        if conv:
            blocks = [ConvBlock(dim, drop_path[i], layer_scale_conv) for i in range(depth)]
        else:
            # mixers first, attention after: the last floor(depth / 2) blocks attend
            first_attention = depth // 2 + 1 if depth % 2 else depth // 2
            blocks = [
                Block(
                    dim,
                    num_heads,
                    use_attention=i >= first_attention,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i],
                    layer_scale=layer_scale,
                )
                for i in range(depth)
            ]
        self.blocks = nn.ModuleList(blocks)
        self.downsample = Downsample(dim) if downsample else None

    def _run_blocks(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = call_block(blk, x, checkpointing=self.grad_checkpointing)
        return x

    def forward_blocks(self, x: Tensor) -> Tensor:
        """The stage's blocks on a (B, C, H, W) map, before the downsampling."""
        if self.conv:
            return self._run_blocks(x)
        _, _, H, W = x.shape
        w = self.window_size
        x = pad_to_multiple(x, w)  # zeros right and bottom, not masked (as trained)
        _, _, Hp, Wp = x.shape
        x = window_reverse(self._run_blocks(window_partition(x, w)), w, Hp, Wp)
        return crop_to(x, H, W)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


_GLOBAL_POOLS = ("avg", "")
# accepted for compatibility with timm/official call sites and ignored: the model has no
# position embedding, any input size works
_IGNORED_ARGS = ("img_size", "resolution", "qk_scale", "bn_eps", "bn_momentum", "scriptable")


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in _GLOBAL_POOLS:
        raise InputError(f"global_pool must be 'avg' or '' (no pooling); got {global_pool!r}")


class MambaVision(NotScriptable, nn.Module):
    """MambaVision with the timm model surface; inputs of any size (multiples of 32 avoid
    padding), floating-point images cast to the model's dtype."""

    @classmethod
    def accepted_args(cls) -> set[str]:
        """The keyword arguments the constructor takes (its own and the ignored ones)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"} | set(_IGNORED_ARGS)

    def __init__(
        self,
        dim: int = 80,
        in_dim: int = 32,
        depths: Sequence[int] = (1, 3, 8, 4),
        window_size: Sequence[int] = (8, 8, 14, 7),
        mlp_ratio: float = 4.0,
        num_heads: Sequence[int] = (2, 4, 8, 16),
        drop_path_rate: float = 0.2,
        in_chans: int = 3,
        num_classes: int = 1000,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        layer_scale: float | None = None,
        layer_scale_conv: float | None = None,
        global_pool: str = "avg",
        **kwargs,
    ):
        super().__init__()
        for name in _IGNORED_ARGS:
            kwargs.pop(name, None)
        if kwargs:
            raise UnexpectedArgumentError(
                f"MambaVision got unexpected arguments {sorted(kwargs)}; it takes {sorted(self.accepted_args())}"
            )
        _check_global_pool(global_pool)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = int(dim * 2 ** (len(depths) - 1))
        self.grad_checkpointing = False
        dpr = drop_path_rates(drop_path_rate, depths)
        self.patch_embed = PatchEmbed(in_chans=in_chans, in_dim=in_dim, dim=dim)
        self.levels = nn.ModuleList()
        self.feature_info = []
        for i, depth in enumerate(depths):
            stage_dim = int(dim * 2**i)
            self.levels.append(
                MambaVisionLayer(
                    dim=stage_dim,
                    depth=depth,
                    num_heads=num_heads[i],
                    window_size=window_size[i],
                    conv=i < 2,
                    downsample=i < len(depths) - 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    layer_scale=layer_scale,
                    layer_scale_conv=layer_scale_conv,
                )
            )
            self.feature_info.append(dict(num_chs=stage_dim, reduction=4 * 2**i, module=f"levels.{i}"))
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # as the official model: every Linear (dt_proj included) gets trunc-normal(0.02) and a
        # zero bias, overwriting the mixer's Mamba-style dt init; convs keep PyTorch's init
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # --- the timm model surface -------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # as timm trains the official model: 1-D parameters are excluded by the optimizer
        # factory; A_log (2-D) is decayed
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for level in self.levels:
            level.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def check_input(self, x: Tensor) -> Tensor:
        return check_image_batch(x, self.in_chans, "MambaVision", parameter_dtype(self.patch_embed))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs before each downsampling (strides 4, 8, 16, 32), as the official
        hub model and detection backbone return them; ``norm`` applies the final BatchNorm
        to the last stage's map."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise InputError(f"output_fmt must be 'NCHW' or 'NHWC'; got {output_fmt!r}")
        x = self.check_input(x)
        take_indices, max_index = feature_take_indices(len(self.levels), indices)
        intermediates = []
        x = self.patch_embed(x)
        last = len(self.levels) - 1
        levels = self.levels[: max_index + 1] if stop_early else self.levels
        for i, level in enumerate(levels):
            x = level.forward_blocks(x)
            if i in take_indices:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 2, 3, 1) if output_fmt == "NHWC" else feat)
            if level.downsample is not None and i < len(levels) - 1:
                x = level.downsample(x)
        if intermediates_only:
            return intermediates
        # the final norm is sized for the last stage: a stop_early run ending before it
        # returns the last map it made, unnormalised
        return (self.norm(x) if len(levels) - 1 == last else x), intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head=True):
        take_indices, max_index = feature_take_indices(len(self.levels), indices)
        if max_index < len(self.levels) - 1:
            self.levels = self.levels[: max_index + 1]
            self.levels[-1].downsample = None  # its output would never be used
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.norm = nn.BatchNorm2d(self.num_features)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> the final normalised map (B, num_features, H/32, W/32)."""
        x = self.check_input(x)
        x = self.patch_embed(x)
        for level in self.levels:
            x = level(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# --- official weights ---------------------------------------------------------------------
_LAYER_SCALE_KEY = re.compile(r"^(levels\.\d+\.blocks\.\d+\.)[A-Za-z_]*?([12])$")


def checkpoint_filter_fn(state_dict: dict, model: MambaVision) -> dict[str, Tensor]:
    """Map an official checkpoint onto esh's MambaVision.

    Takes the training ``.pth.tar`` dict (weights under ``state_dict``), a hub
    ``model.safetensors`` (keys under the wrapper's ``model.`` prefix, layer scales renamed
    from ``gamma_1``/``gamma_2`` because transformers rewrites keys containing "gamma") or a
    plain state dict. Parameter names are otherwise the official ones.
    """
    state = extract_state_dict(state_dict, keys=("state_dict", "model"))
    state = strip_prefix(strip_prefix(state, "module."), "model.")
    own = model.state_dict()
    out = {}
    for k, v in state.items():
        if k not in own:
            m = _LAYER_SCALE_KEY.match(k)
            if m and f"{m.group(1)}gamma_{m.group(2)}" in own:
                k = f"{m.group(1)}gamma_{m.group(2)}"
        out[k] = v
    return out


def _guess_variant(state: dict[str, Tensor]) -> str | None:
    """Which released variant a mapped state dict fits, by key set and shapes."""
    with torch.device("meta"):
        for name, args in _ARCHS.items():
            model = MambaVision(**args)
            own = model.state_dict()
            if own.keys() == state.keys() and all(own[k].shape == state[k].shape for k in own):
                return name
    return None


def _variant_hint(variant: str):
    """The sentence a load error ends with when the file fits another released variant."""

    def hint(state: dict[str, Tensor]) -> str:
        guess = _guess_variant(state)
        return f"The file looks like a {guess} checkpoint." if guess and guess != variant else ""

    return hint


def load_checkpoint(
    model: MambaVision, path: str | os.PathLike, variant: str = "MambaVision", ignore_classifier: bool = False
) -> None:
    """Load an official file or an esh checkpoint into ``model`` (``esh.models._builder.load_checkpoint``)."""
    load_weights(model, path, ignore_classifier=ignore_classifier, what=variant, load_hint=_variant_hint(variant))


# --- configurations -----------------------------------------------------------------------
def _cfg(hf_hub_id: str | None = None, **kwargs) -> dict:
    return vision_cfg(
        **{
            "hf_hub_id": hf_hub_id,
            "hf_hub_filename": "model.safetensors" if hf_hub_id else None,
            "pool_size": (7, 7),
            "crop_pct": 1.0,
            "first_conv": "patch_embed.conv_down.0",
            "license": "CC-BY-NC-SA-4.0 (weights)",
            "origin_url": "https://github.com/NVlabs/MambaVision",
            "paper_ids": "arXiv:2407.08083",
            **kwargs,
        }
    )


_AT_512 = dict(input_size=(3, 512, 512), pool_size=(16, 16), crop_pct=0.93, crop_mode="squash")

default_cfgs = _timm.models.generate_default_cfgs(
    {
        "mambavision_nano": _cfg(
            input_size=(3, 56, 56),
            pool_size=(2, 2),
            license="esh configuration, no released weights",
            origin_url=None,
            paper_ids=None,
        ),
        "mambavision_t": _cfg("nvidia/MambaVision-T-1K"),
        "mambavision_t2": _cfg("nvidia/MambaVision-T2-1K", crop_pct=0.98),
        "mambavision_s": _cfg("nvidia/MambaVision-S-1K", crop_pct=0.93),
        "mambavision_b": _cfg("nvidia/MambaVision-B-1K"),
        "mambavision_l": _cfg("nvidia/MambaVision-L-1K"),
        "mambavision_l2": _cfg("nvidia/MambaVision-L2-1K"),
        "mambavision_b_21k": _cfg("nvidia/MambaVision-B-21K"),
        "mambavision_l_21k": _cfg("nvidia/MambaVision-L-21K"),
        "mambavision_l2_512_21k": _cfg("nvidia/MambaVision-L2-512-21K", **_AT_512),
        "mambavision_l3_256_21k": _cfg("nvidia/MambaVision-L3-256-21K", input_size=(3, 256, 256), pool_size=(8, 8)),
        "mambavision_l3_512_21k": _cfg("nvidia/MambaVision-L3-512-21K", **_AT_512),
    }
)

# the authors' training files (the GitHub release's .pth.tar, which load unchanged), kept beside
# the timm cfgs because timm's PretrainedCfg has no field for them
official_filenames = {
    "mambavision_t": "mambavision_tiny_1k.pth.tar",
    "mambavision_t2": "mambavision_tiny2_1k.pth.tar",
    "mambavision_s": "mambavision_small_1k.pth.tar",
    "mambavision_b": "mambavision_base_1k.pth.tar",
    "mambavision_l": "mambavision_large_1k.pth.tar",
    "mambavision_l2": "mambavision_large2_1k.pth.tar",
    "mambavision_b_21k": "mambavision_base_21k.pth.tar",
    "mambavision_l_21k": "mambavision_large_21k.pth.tar",
    "mambavision_l2_512_21k": "mambavision_L2_21k_240m_512.pth.tar",
    "mambavision_l3_256_21k": "mambavision_L3_21k_740m_256.pth.tar",
    "mambavision_l3_512_21k": "mambavision_L3_21k_740m_512.pth.tar",
}

# architectures (the paper's table of variants); the 21K models reuse the 1K ones' shapes
_SMALL_HEADS = dict(window_size=(8, 8, 14, 7), mlp_ratio=4, num_heads=(2, 4, 8, 16))
_LARGE_HEADS = dict(window_size=(8, 8, 14, 7), mlp_ratio=4, num_heads=(4, 8, 16, 32))
_T = dict(dim=80, in_dim=32, depths=(1, 3, 8, 4), drop_path_rate=0.2, **_SMALL_HEADS)
_T2 = dict(_T, depths=(1, 3, 11, 4))
_S = dict(dim=96, in_dim=64, depths=(3, 3, 7, 5), drop_path_rate=0.2, **_SMALL_HEADS)
_B = dict(dim=128, in_dim=64, depths=(3, 3, 10, 5), drop_path_rate=0.3, layer_scale=1e-5, **_SMALL_HEADS)
_L = dict(_B, dim=196, **_LARGE_HEADS)
_L2 = dict(_L, depths=(3, 3, 12, 5))
_L3 = dict(_L, dim=256, depths=(3, 3, 20, 10), drop_path_rate=0.5)

_ARCHS: dict[str, dict] = {
    # not an official release: esh's CPU-sized configuration, the default model of `esh train`
    # (56x56 input: the stage-3/4 maps of 4x4 and 2x2 are each one window)
    "mambavision_nano": dict(
        dim=32, in_dim=16, depths=(1, 1, 2, 2), num_heads=(1, 2, 4, 8), window_size=(8, 8, 4, 2), drop_path_rate=0.0
    ),
    "mambavision_t": _T,
    "mambavision_t2": _T2,
    "mambavision_s": _S,
    "mambavision_b": _B,
    "mambavision_l": _L,
    "mambavision_l2": _L2,
    "mambavision_b_21k": _B,
    "mambavision_l_21k": _L,
    "mambavision_l2_512_21k": dict(_L2, window_size=(8, 8, 32, 16)),
    "mambavision_l3_256_21k": dict(_L3, window_size=(8, 8, 16, 8)),
    "mambavision_l3_512_21k": dict(_L3, window_size=(8, 8, 32, 16)),
}


def _create_mambavision(
    variant: str, pretrained: bool = False, checkpoint_path: str | None = None, **kwargs
) -> nn.Module:
    return build_model(
        MambaVision,
        variant,
        pretrained,
        checkpoint_path,
        checkpoint_filter_fn=checkpoint_filter_fn,
        load_hint=_variant_hint(variant),
        feature_cfg=dict(out_indices=(0, 1, 2, 3)),
        official_filename=official_filenames.get(variant),
        **{**_ARCHS[variant], **kwargs},
    )


@register_model(timm=True)
def mambavision_nano(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> MambaVision:
    """MambaVision nano: dim 32, depths (1, 1, 2, 2), 56x56 input; esh's CPU-sized model, no weights."""
    return _create_mambavision("mambavision_nano", pretrained, checkpoint_path, **kwargs)


@register_model(timm=True)
def mambavision_t(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> MambaVision:
    """MambaVision-T: dim 80, depths (1, 3, 8, 4); IN-1K 82.3%."""
    return _create_mambavision("mambavision_t", pretrained, checkpoint_path, **kwargs)


@register_model(timm=True)
def mambavision_t2(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> MambaVision:
    """MambaVision-T2: dim 80, depths (1, 3, 11, 4)."""
    return _create_mambavision("mambavision_t2", pretrained, checkpoint_path, **kwargs)


@register_model(timm=True)
def mambavision_s(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> MambaVision:
    """MambaVision-S: dim 96, depths (3, 3, 7, 5)."""
    return _create_mambavision("mambavision_s", pretrained, checkpoint_path, **kwargs)


@register_model(timm=True)
def mambavision_b(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> MambaVision:
    """MambaVision-B: dim 128, depths (3, 3, 10, 5), layer scale."""
    return _create_mambavision("mambavision_b", pretrained, checkpoint_path, **kwargs)


@register_model(timm=True)
def mambavision_l(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> MambaVision:
    """MambaVision-L: dim 196, depths (3, 3, 10, 5), layer scale."""
    return _create_mambavision("mambavision_l", pretrained, checkpoint_path, **kwargs)


@register_model(timm=True)
def mambavision_l2(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> MambaVision:
    """MambaVision-L2: dim 196, depths (3, 3, 12, 5), layer scale."""
    return _create_mambavision("mambavision_l2", pretrained, checkpoint_path, **kwargs)


@register_model(timm=True)
def mambavision_b_21k(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> MambaVision:
    """MambaVision-B pre-trained on ImageNet-21K, fine-tuned on 1K."""
    return _create_mambavision("mambavision_b_21k", pretrained, checkpoint_path, **kwargs)


@register_model(timm=True)
def mambavision_l_21k(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> MambaVision:
    """MambaVision-L pre-trained on ImageNet-21K, fine-tuned on 1K."""
    return _create_mambavision("mambavision_l_21k", pretrained, checkpoint_path, **kwargs)


@register_model(timm=True)
def mambavision_l2_512_21k(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> MambaVision:
    """MambaVision-L2 from ImageNet-21K at 512x512 (windows 32 and 16 in stages 3 and 4)."""
    return _create_mambavision("mambavision_l2_512_21k", pretrained, checkpoint_path, **kwargs)


@register_model(timm=True)
def mambavision_l3_256_21k(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> MambaVision:
    """MambaVision-L3 (dim 256, depths (3, 3, 20, 10)) from ImageNet-21K at 256x256."""
    return _create_mambavision("mambavision_l3_256_21k", pretrained, checkpoint_path, **kwargs)


@register_model(timm=True)
def mambavision_l3_512_21k(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> MambaVision:
    """MambaVision-L3 (dim 256, depths (3, 3, 20, 10)) from ImageNet-21K at 512x512."""
    return _create_mambavision("mambavision_l3_512_21k", pretrained, checkpoint_path, **kwargs)
