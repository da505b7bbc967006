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
from torch import Tensor, nn

from esh._compat import import_timm
from esh.errors import InputError
from esh.layers import BiMambaMixer
from esh.layers.norm import fused_rms_norm
from esh.models._builder import build_model, call_block, drop_path_rates, vision_cfg
from esh.models._builder import load_checkpoint as load_weights
from esh.models._checkpoint import CheckpointError, extract_state_dict, strip_prefix
from esh.models._inputs import cast_images, check_image_batch, parameter_dtype
from esh.models._scripting import NotScriptable
from esh.models.registry import register_model

_timm = import_timm()
DropPath = _timm.layers.DropPath
trunc_normal_ = _timm.layers.trunc_normal_
feature_take_indices = _timm.models._features.feature_take_indices
register_notrace_function = _timm.layers.register_notrace_function
resample_abs_pos_embed = _timm.layers.resample_abs_pos_embed

__all__ = ["VisionMamba", "checkpoint_filter_fn", "resize_pos_embed"]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return _rms_norm_f32(x, self.weight, self.eps)


@torch.fx.wrap  # one node of an FX graph, which then runs what eager runs
def _rms_norm_f32(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Vim's RMSNorm: esh's fused CPU kernel for float32 CPU tensors where it applies, else the
    formula in float32, cast back to x's dtype."""
    y = fused_rms_norm(x, (x.shape[-1],), weight, eps)
    if y is not None:
        return y
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


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
def check_vim_input(
    x: object,
    in_chans: int,
    img_size: tuple[int, int],
    patch_size: int,
    dynamic: bool,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``x`` must be a (batch, in_chans, *img_size) floating-point tensor, the size the position
    embedding was built for, or with ``dynamic`` any image batch of at least one patch; returns
    ``x``, cast to ``dtype`` (the model's) when given and different."""
    if dynamic:
        x = check_image_batch(x, in_chans, "Vim", dtype)
        if min(x.shape[-2:]) < patch_size:
            raise InputError(f"Vim needs images of at least one {patch_size}x{patch_size} patch; got {tuple(x.shape)}")
        return x
    want = (in_chans, *img_size)
    if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(
            f"this Vim was built for inputs (batch, {want[0]}, {want[1]}, {want[2]}); got {got}. "
            f"Build it for another size with create_model(..., img_size=...): checkpoints' "
            f"position embeddings are resized on load; or with dynamic_img_size=True for any size"
        )
    return cast_images(x, "Vim", dtype)


class VisionMamba(NotScriptable, nn.Module):
    """Vim with the timm model surface. Inputs must be ``img_size`` (the position embedding's
    grid) unless built with ``dynamic_img_size=True``; floating-point images are cast to the
    model's dtype."""

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
        dynamic_img_size: bool = False,
    ):
        super().__init__()
        _check_global_pool(global_pool)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size, self.stride, self.in_chans = patch_size, stride, in_chans
        self.num_classes, self.global_pool = num_classes, global_pool
        # False: inputs must be img_size (the official model); True: any size of at least one
        # patch, with pos_embed resized to the input's grid on the fly
        self.dynamic_img_size = dynamic_img_size
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grid = tuple((s - patch_size) // stride + 1 for s in self.img_size)
        if min(self.grid) < 1:
            raise InputError(f"img_size {self.img_size} is smaller than the patch size {patch_size}")
        num_patches = self.grid[0] * self.grid[1]
        self.token_position = num_patches // 2  # the class token sits in the middle
        self.grad_checkpointing = False

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        dpr = drop_path_rates(drop_path_rate, (depth,))[0]
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
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def check_input(self, x: Tensor) -> Tensor:
        dtype = parameter_dtype(self.patch_embed)
        return check_vim_input(x, self.in_chans, self.img_size, self.patch_size, self.dynamic_img_size, dtype)

    def _embed(self, x: Tensor) -> Tensor:
        x = self.check_input(x)
        x = self.patch_embed.proj(x)
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, M, D), raster order
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        p, pos_embed = self.token_position, self.pos_embed
        if self.dynamic_img_size:  # the class token goes to the middle of this input's grid
            p = grid[0] * grid[1] // 2
            pos_embed = resize_pos_embed(pos_embed, self.grid, (grid[0], grid[1]))
        return torch.cat([x[:, :p], cls, x[:, p:]], dim=1) + pos_embed

    def _grid_of(self, x: Tensor) -> tuple[int, int]:
        """The patch grid of an input image batch."""
        if not self.dynamic_img_size:
            return self.grid
        return ((x.shape[-2] - self.patch_size) // self.stride + 1, (x.shape[-1] - self.patch_size) // self.stride + 1)

    def _blocks(
        self, x: Tensor, indices: Sequence[int] = (), stop_after: int | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Run the blocks (up to block ``stop_after``), then the final norm; also returns the
        stream after each block in ``indices``."""
        layers = self.layers if stop_after is None else self.layers[: stop_after + 1]
        hidden, residual, taken = x, None, []
        for i, layer in enumerate(layers):
            hidden, residual = call_block(layer, hidden, residual, checkpointing=self.grad_checkpointing)
            if i in indices:
                taken.append(residual + hidden.float())  # the stream after block i
        residual = residual + self.drop_path(hidden).float()
        return self.norm_f(residual).to(x.dtype), taken

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> normalised tokens (B, M + 1, D), the class token at ``token_position``."""
        return self._blocks(self._embed(x))[0]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "token":
            # the class token is entry M // 2 of the M + 1 tokens, whatever the grid
            x = x[:, (x.shape[1] - 1) // 2] if self.dynamic_img_size else x[:, self.token_position]
        elif self.global_pool == "avg":
            x = x.mean(1)
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
        """Per-block patch maps: the residual stream after each block in ``indices`` (an int n:
        the last n blocks), class token removed; ``norm`` applies the final RMSNorm to them.
        With ``stop_early`` (or ``intermediates_only``) no block after the last one asked for
        runs, and the final tokens returned are the normalised stream at that block."""
        if output_fmt not in ("NCHW", "NLC"):
            raise InputError(f"output_fmt must be 'NCHW' or 'NLC'; got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.layers), indices)
        grid = self._grid_of(x)
        stop = max_index if stop_early or intermediates_only else None
        final, taken = self._blocks(self._embed(x), take, stop)
        p = grid[0] * grid[1] // 2
        out = []
        for t in taken:
            t = self.norm_f(t).to(x.dtype) if norm else t.to(x.dtype)
            t = torch.cat([t[:, :p], t[:, p + 1 :]], dim=1)
            if output_fmt == "NCHW":
                t = t.transpose(1, 2).reshape(t.shape[0], -1, *grid)
            out.append(t)
        return out if intermediates_only else (final, out)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm, the head) for a
        feature extractor; returns the block indices to take."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[: max_index + 1]
        if prune_norm:
            self.norm_f = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ("token", "avg", ""):
        raise InputError(
            f"global_pool must be 'token' (the class token), 'avg' (mean of all tokens) or '' (no pooling); "
            f"got {global_pool!r}"
        )


# --- official weights ---------------------------------------------------------------------
@torch.fx.wrap
@register_notrace_function
def resize_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Resize a middle-class-token position embedding (1, M + 1, D) to another patch grid.

    The class token's entry is taken out at index M // 2, the patch entries are resized as a
    grid (timm's ``resample_abs_pos_embed``: bicubic, align_corners=False, no antialiasing)
    and the class entry is put back at the new M' // 2. Used on load and, with
    ``dynamic_img_size``, on every forward. (The authors' own fine-tuning script treated entry
    0 as the extra token instead; the released "+" checkpoints were made that way and are
    loaded as they are, not resized.)
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    p = old_grid[0] * old_grid[1] // 2
    cls = pos_embed[:, p : p + 1]
    grid = torch.cat([pos_embed[:, :p], pos_embed[:, p + 1 :]], dim=1)
    grid = resample_abs_pos_embed(grid, list(new_grid), list(old_grid), num_prefix_tokens=0, antialias=False)
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
    if pe is not None and pe.dim() == 3 and pe.is_floating_point() and pe.shape[1] != model.pos_embed.shape[1]:
        side = math.isqrt(max(pe.shape[1] - 1, 0))
        if side < 1 or side * side != pe.shape[1] - 1:
            raise CheckpointError(f"pos_embed of {pe.shape[1]} entries is not a square grid plus a class token")
        state["pos_embed"] = resize_pos_embed(pe, (side, side), model.grid)
    return state


def load_checkpoint(
    model: VisionMamba, path: str, variant: str = "Vim", ema: bool = False, ignore_classifier: bool = False
) -> None:
    """Load an official ``.pth`` (``ema=True``: its ``model_ema`` weights) or a state dict
    (``esh.models._builder.load_checkpoint``)."""

    def filter_fn(state_dict: dict, model: VisionMamba) -> dict[str, Tensor]:
        return checkpoint_filter_fn(state_dict, model, use_ema=ema)

    load_weights(model, path, ignore_classifier=ignore_classifier, what=variant, filter_fn=filter_fn)


def _checkpoint_stride(checkpoint: dict, img_size: int, patch: int = 16) -> int | None:
    """Stride 16 or 8, read from the checkpoint's pos_embed length (197 vs 730 at 224): the
    stride whose grid at ``img_size``, else at the released 224, has that many patches."""
    try:
        state = extract_state_dict(checkpoint, ("model", "state_dict"))
    except CheckpointError:
        return None  # the load reports what the file lacks
    pe = state.get("pos_embed")
    if pe is None or pe.dim() != 3:
        return None
    side = math.isqrt(max(pe.shape[1] - 1, 0))
    for size in (img_size, 224):
        for stride in (16, 8):
            if (size - patch) // stride + 1 == side:
                return stride
    return None


def _stride_from_checkpoint(checkpoint: dict, model_kwargs: dict) -> dict:
    """A "+" file builds the stride-8 model, whichever name it is loaded under."""
    img = model_kwargs.get("img_size", 224)
    stride = _checkpoint_stride(checkpoint, img if isinstance(img, int) else img[0])
    return model_kwargs if stride is None else {**model_kwargs, "stride": stride}


def _cfg(hf_hub_id: str, filename: str, **kwargs) -> dict:
    return vision_cfg(
        **{
            "hf_hub_id": hf_hub_id,
            "hf_hub_filename": filename,
            "fixed_input_size": True,  # unless built with dynamic_img_size=True
            "crop_pct": 0.875,
            "first_conv": "patch_embed.proj",
            "origin_url": "https://github.com/hustvl/Vim",
            "paper_ids": "arXiv:2401.09417",
            **kwargs,
        }
    )


default_cfgs = _timm.models.generate_default_cfgs(
    {
        "vim_tiny": _cfg("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
        "vim_tiny_s8": _cfg("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth"),
        "vim_small": _cfg("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
        "vim_small_s8": _cfg("hustvl/Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth"),
        # named by analogy with the tiny and small files
        "vim_base": _cfg("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth"),
    }
)


def _create_vim(
    variant: str,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    model_args: dict | None = None,
    ema: bool = False,
    **kwargs,
) -> nn.Module:
    return build_model(
        VisionMamba,
        variant,
        pretrained,
        checkpoint_path,
        checkpoint_filter_fn=lambda state_dict, model: checkpoint_filter_fn(state_dict, model, use_ema=ema),
        # the caller's stride wins over the checkpoint's, the checkpoint's over the variant's
        checkpoint_args=None if "stride" in kwargs else _stride_from_checkpoint,
        feature_cfg=dict(out_indices=3),  # the last three blocks, as timm's ViTs
        **{**(model_args or {}), **kwargs},
    )


@register_model(timm=True)
def vim_tiny(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> VisionMamba:
    """Vim-tiny: 24 blocks of width 192, patch 16 stride 16 (197 tokens); IN-1K 76.1%."""
    return _create_vim("vim_tiny", pretrained, checkpoint_path, dict(embed_dim=192), **kwargs)


@register_model(timm=True)
def vim_tiny_s8(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> VisionMamba:
    """Vim-tiny+: Vim-tiny with the patch conv at stride 8 (730 tokens); IN-1K 78.3%."""
    return _create_vim("vim_tiny_s8", pretrained, checkpoint_path, dict(embed_dim=192, stride=8), **kwargs)


@register_model(timm=True)
def vim_small(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> VisionMamba:
    """Vim-small: 24 blocks of width 384, stride 16; IN-1K 80.5%."""
    return _create_vim("vim_small", pretrained, checkpoint_path, dict(embed_dim=384), **kwargs)


@register_model(timm=True)
def vim_small_s8(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> VisionMamba:
    """Vim-small+: Vim-small with the patch conv at stride 8; IN-1K 81.6%."""
    return _create_vim("vim_small_s8", pretrained, checkpoint_path, dict(embed_dim=384, stride=8), **kwargs)


@register_model(timm=True)
def vim_base(pretrained: bool = False, checkpoint_path: str | None = None, **kwargs) -> VisionMamba:
    """Vim-base: 24 blocks of width 768, stride 16; IN-1K 81.9%."""
    return _create_vim("vim_base", pretrained, checkpoint_path, dict(embed_dim=768), **kwargs)
