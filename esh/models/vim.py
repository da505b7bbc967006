"""Vision Mamba (Vim; Zhu et al., ICML 2024; hustvl/Vim) with a middle class token.

A plain (non-hierarchical) backbone: patch embedding, a class token inserted in the middle of
the patch sequence, absolute position embeddings, 24 residual blocks of RMSNorm + the
bidirectional "bimamba v2" mixer with the residual stream kept in float32, a final RMSNorm,
and the class token's output into the head. Parameter names are the official ones, so the
released ``.pth`` files load unchanged; the scan is ``esh.ops.selective_scan``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esh._compat import import_timm
from esh.layers import BiMambaMixer
from esh.models._checkpoint import (
    CheckpointError,
    download_weights,
    extract_state_dict,
    load_into,
    read_checkpoint,
    strip_prefix,
)
from esh.models._scripting import NotScriptable
from esh.models.registry import register_variants

_timm = import_timm()
DropPath = _timm.layers.DropPath
trunc_normal_ = _timm.layers.trunc_normal_
register_notrace_function = _timm.layers.register_notrace_function
feature_take_indices = _timm.models._features.feature_take_indices

__all__ = ["VisionMamba", "checkpoint_filter_fn", "resize_pos_embed"]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class Block(nn.Module):
    """Add -> RMSNorm -> mixer, with the residual stream carried in float32."""

    def __init__(self, dim: int, drop_path: float = 0.0, eps: float = 1e-5, **mixer_kwargs):
        super().__init__()
        self.mixer = BiMambaMixer(dim, **mixer_kwargs)
        self.norm = RMSNorm(dim, eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        residual = hidden.float() if residual is None else residual + self.drop_path(hidden).float()
        return self.mixer(self.norm(residual).to(hidden.dtype)), residual


@register_notrace_function  # torch.fx calls it (it branches on the input's shape) and keeps it in graphs
def check_vim_input(x: object, in_chans: int, img_size: tuple[int, int]) -> Tensor:
    """``x`` must be a (batch, in_chans, *img_size) tensor, the size the position embedding
    was built for; returns ``x``."""
    want = (in_chans, *img_size)
    if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"this Vim was built for inputs (batch, {want[0]}, {want[1]}, {want[2]}); got {got}. "
            f"Build it for another size with create_model(..., img_size=...): checkpoints' "
            f"position embeddings are resized on load"
        )
    return x


class VisionMamba(NotScriptable, nn.Module):
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        stride: int = 16,
        depth: int = 24,
        embed_dim: int = 192,
        in_chans: int = 3,
        num_classes: int = 1000,
        d_state: int = 16,
        drop_path_rate: float = 0.0,
        norm_epsilon: float = 1e-5,
        global_pool: str = "token",
    ):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size, self.stride, self.in_chans = patch_size, stride, in_chans
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grid = tuple((s - patch_size) // stride + 1 for s in self.img_size)
        if min(self.grid) < 1:
            raise ValueError(f"img_size {self.img_size} is smaller than the patch size {patch_size}")
        num_patches = self.grid[0] * self.grid[1]
        self.token_position = num_patches // 2  # the class token sits in the middle
        self.grad_checkpointing = False

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.layers = nn.ModuleList(
            Block(embed_dim, drop_path=dpr[i], eps=norm_epsilon, d_state=d_state) for i in range(depth)
        )
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RMSNorm(embed_dim, norm_epsilon)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=embed_dim, reduction=stride, module=f"layers.{i}") for i in range(depth)]
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:  # GPT-2 style: scaled out_proj, zero biases but the forward dt bias
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(depth)
                layer.mixer.dt_proj_b.bias.zero_()

    # --- the timm model surface -------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def check_input(self, x: Tensor) -> Tensor:
        return check_vim_input(x, self.in_chans, self.img_size)

    def _embed(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, M, D), raster order
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        p = self.token_position
        return torch.cat([x[:, :p], cls, x[:, p:]], dim=1) + self.pos_embed

    def _blocks(self, x: Tensor, indices: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        hidden, residual, taken = x, None, []
        for i, layer in enumerate(self.layers):
            if self.grad_checkpointing and torch.is_grad_enabled():
                hidden, residual = torch.utils.checkpoint.checkpoint(layer, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual)
            if i in indices:
                taken.append(residual + hidden.float())  # the stream after block i
        residual = residual + self.drop_path(hidden).float()
        return self.norm_f(residual).to(x.dtype), taken

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> normalised tokens (B, M + 1, D), the class token at ``token_position``."""
        return self._blocks(self._embed(x))[0]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, self.token_position] if self.global_pool == "token" else x.mean(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Per-block patch maps (the residual stream after each block, class token removed)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC'; got {output_fmt!r}")
        take, _ = feature_take_indices(len(self.layers), indices)
        final, taken = self._blocks(self._embed(x), take)
        p = self.token_position
        out = []
        for t in taken:
            t = self.norm_f(t).to(x.dtype) if norm else t.to(x.dtype)
            t = torch.cat([t[:, :p], t[:, p + 1 :]], dim=1)
            if output_fmt == "NCHW":
                t = t.transpose(1, 2).reshape(t.shape[0], -1, *self.grid)
            out.append(t)
        return out if intermediates_only else (final, out)


# --- official weights ---------------------------------------------------------------------
def resize_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Resize a middle-class-token position embedding (1, M + 1, D) to another patch grid.

    The class token's entry is taken out at index M // 2, the patch entries are resized as a
    grid (bicubic, align_corners=False) and the class entry is put back at the new M' // 2.
    (The authors' own fine-tuning script treated entry 0 as the extra token instead; the
    released "+" checkpoints were made that way and are loaded as they are, not resized.)
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    m = old_grid[0] * old_grid[1]
    p = m // 2
    cls = pos_embed[:, p : p + 1]
    grid = torch.cat([pos_embed[:, :p], pos_embed[:, p + 1 :]], dim=1)
    grid = grid.reshape(1, *old_grid, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(pos_embed.dtype)
    q = grid.shape[1] // 2
    return torch.cat([grid[:, :q], cls, grid[:, q:]], dim=1)


def checkpoint_filter_fn(state_dict: dict, model: VisionMamba, use_ema: bool = False) -> dict[str, Tensor]:
    """Official ``.pth`` (``model`` / ``model_ema``) or a plain state dict -> esh's keys, with the
    position embedding resized when the model was built for another grid."""
    keys = ("model_ema", "state_dict_ema") if use_ema else ("model", "state_dict")
    if use_ema and not any(k in state_dict for k in keys):
        raise CheckpointError("the checkpoint has no EMA weights (model_ema); load it without ema=True")
    state = strip_prefix(extract_state_dict(state_dict, keys), "module.")
    pe = state.get("pos_embed")
    if pe is not None and pe.shape[1] != model.pos_embed.shape[1]:
        side = math.isqrt(pe.shape[1] - 1)
        if side * side != pe.shape[1] - 1:
            raise CheckpointError(f"pos_embed of {pe.shape[1]} entries is not a square grid plus a class token")
        state["pos_embed"] = resize_pos_embed(pe, (side, side), model.grid)
    return state


def _checkpoint_stride(path: str, img_size: int, patch: int = 16) -> int | None:
    """Stride 16 or 8, read from the checkpoint's pos_embed length (197 vs 730 at 224)."""
    obj = read_checkpoint(path)
    state = extract_state_dict(obj, ("model", "state_dict"))
    pe = state.get("pos_embed")
    if pe is None:
        return None
    side = math.isqrt(pe.shape[1] - 1)
    for stride in (16, 8):
        if (img_size - patch) // stride + 1 == side:
            return stride
    return None


def _cfg(hf_hub_id: str | None, filename: str | None, **kwargs) -> dict:
    return {
        "hf_hub_id": hf_hub_id,
        "hf_hub_filename": filename,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "crop_pct": 0.875,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


_VARIANTS = {
    "vim_tiny": (dict(embed_dim=192), _cfg("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth")),
    "vim_tiny_s8": (dict(embed_dim=192, stride=8), _cfg("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth")),
    "vim_small": (dict(embed_dim=384), _cfg("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth")),
    "vim_small_s8": (
        dict(embed_dim=384, stride=8),
        _cfg("hustvl/Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth"),
    ),
    # the base file's name was not seen (facts/vim.md); by analogy with the others
    "vim_base": (dict(embed_dim=768), _cfg("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth")),
}


def _create_vim(variant: str, pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> VisionMamba:
    args, cfg = _VARIANTS[variant]
    ema = kwargs.pop("ema", False)
    cache_dir = kwargs.pop("cache_dir", None)
    if pretrained and checkpoint_path is None:
        checkpoint_path = download_weights(cfg, variant, cache_dir)
    args = {**args, **kwargs}
    if checkpoint_path is not None and "stride" not in kwargs:
        img = args.get("img_size", 224)
        stride = _checkpoint_stride(checkpoint_path, img if isinstance(img, int) else img[0])
        if stride is not None:
            args["stride"] = stride  # a "+" file builds the stride-8 model
    model = VisionMamba(**args)
    model.pretrained_cfg = model.default_cfg = {
        **cfg,
        "architecture": variant,
        "input_size": (3, *model.img_size),
    }
    if checkpoint_path is not None:
        state = checkpoint_filter_fn(read_checkpoint(checkpoint_path), model, use_ema=ema)
        load_into(model, state, variant)
    return model


globals().update(register_variants(__name__, _VARIANTS, _create_vim, "Vision Mamba"))
default_cfgs = {name: cfg for name, (_, cfg) in _VARIANTS.items()}
