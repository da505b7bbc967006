"""ESH-Vision's block: a per-patch blend of relative-position attention and a bidirectional SSM,
an FFN, and ACT pondering for the patches the router sends to attention.

Soft routing (training, the default): every patch runs both paths and
y = α · Attn(LN x) + (1 - α) · VSSM(LN x); x += DropPath(LayerScale(y)); then
x += DropPath(LayerScale(FFN(LN x))). Patches with α > θ then ponder (``AdaptiveComputationTime``).

Hard routing (``set_routing("hard", ...)``, inference) selects the patches that get attention:
those above a threshold, or a fixed budget per image (the top-k by α). Work is skipped, not
masked:

* attention runs on the selected patches only, each attending to the selected patches of its
  own window (global where the map fits in one window): ``RelativeMHSA.forward_tokens``;
* pondering runs on the selected patches with α > θ only;
* the SSM (default, ``exclusive=False``) scans every patch, as in training, so its recurrence
  sees the sequence it was trained on; a selected patch keeps its trained blend
  α · Attn + (1 - α) · SSM and the others take the SSM alone (their α · Attn term, small by
  construction, is the approximation). With ``exclusive=True`` each patch takes exactly one
  path: the SSM scans only the unselected patches, in raster order, forward and reversed (less
  work when many patches are selected, but the scan then sees a sequence it never saw in
  training).

A ponder step re-applies the block's attention branch (among the still-running patches) and
its FFN, with the block's own weights, as ACT re-applies one transition function; DropPath is
not applied inside ponder steps. With α forced to 0 or 1 everywhere, both modes compute the
same function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from esh._compat import import_timm
from esh.errors import InputError

from .act import AdaptiveComputationTime
from .relative_attention import RelativeMHSA
from .router import SpatialSoftEntropyRouter
from .vssm import BidirectionalVSSM

_timm = import_timm()
DropPath = _timm.layers.DropPath
LayerScale = _timm.layers.LayerScale
Mlp = _timm.layers.Mlp
register_notrace_module = _timm.layers.register_notrace_module

__all__ = ["HybridVisionBlock", "gather_sequences", "select_tokens"]

ROUTING_MODES = ("soft", "hard")


def select_tokens(alpha: Tensor, attention_fraction: float | None = None, threshold: float = 0.5) -> Tensor:
    """(B, H, W) α -> (B, H, W) bool: the patches routed to attention.

    With ``attention_fraction``, the top ``round(fraction * H * W)`` patches of each image by α
    (a fixed budget per image); otherwise the patches with α > ``threshold``.
    """
    if attention_fraction is None:
        return alpha > threshold
    B = alpha.shape[0]
    flat = alpha.reshape(B, -1)
    k = round(float(attention_fraction) * flat.shape[1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, flat.topk(k, dim=1).indices, True)
    return mask.view_as(alpha)


def gather_sequences(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L) bool -> (index (B, Lmax), valid (B, Lmax), lengths (B,)): per row, the positions
    where ``mask`` is True in increasing order, padded at the end (``valid`` False) to the
    longest row."""
    B, L = mask.shape
    ar = torch.arange(L, device=mask.device)
    key = torch.where(mask, ar, ar + L)  # selected positions first, each group in order
    lengths = mask.sum(1)
    Lmax = int(lengths.max()) if B else 0
    index = key.sort(dim=1).values[:, :Lmax] % L
    valid = torch.arange(Lmax, device=mask.device) < lengths[:, None]
    return index, valid, lengths


# A leaf for torch.fx (called, not traced): which patches attend and how long they ponder
# depends on the router's values, and attention windows on the map's size.
@register_notrace_module
class HybridVisionBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        d_state: int = 8,
        ssm_expand: float = 1.0,
        d_conv: int = 4,
        router_hidden_ratio: float = 0.25,
        ponder_threshold: float = 0.5,
        max_ponder_steps: int = 2,
        halt_eps: float = 0.01,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale_init_value: float | None = 1e-2,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.ponder_threshold = ponder_threshold
        self.norm1 = norm_layer(dim)
        self.router = SpatialSoftEntropyRouter(dim, hidden_ratio=router_hidden_ratio)
        self.attn = RelativeMHSA(dim, num_heads, window_size, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.ssm = BidirectionalVSSM(dim, d_state=d_state, d_conv=d_conv, expand=ssm_expand)
        ls = (lambda: LayerScale(dim, layer_scale_init_value)) if layer_scale_init_value else nn.Identity
        self.ls1 = ls()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.ls2 = ls()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.act = AdaptiveComputationTime(dim, max_steps=1 + max_ponder_steps, eps=halt_eps)
        self.routing = "soft"
        self.attention_fraction: float | None = None
        self.threshold = 0.5
        self.force_alpha: float | None = None
        self.exclusive = False

    def set_routing(
        self,
        mode: str = "soft",
        attention_fraction: float | None = None,
        threshold: float = 0.5,
        force_alpha: float | None = None,
        exclusive: bool = False,
    ) -> None:
        """See ``ESHVision.set_routing``."""
        if mode not in ROUTING_MODES:
            raise InputError(f"routing mode must be one of {ROUTING_MODES}; got {mode!r}")
        if attention_fraction is not None and not 0.0 <= float(attention_fraction) <= 1.0:
            raise InputError(f"attention_fraction must be in [0, 1] or None; got {attention_fraction}")
        if mode == "soft" and attention_fraction is not None:
            raise InputError("attention_fraction is a hard-routing budget; use set_routing('hard', ...)")
        if force_alpha is not None and not 0.0 <= float(force_alpha) <= 1.0:
            raise InputError(f"force_alpha must be in [0, 1] or None; got {force_alpha}")
        self.routing, self.attention_fraction, self.threshold = mode, attention_fraction, float(threshold)
        self.force_alpha = None if force_alpha is None else float(force_alpha)
        self.exclusive = bool(exclusive)

    # --- the two ways of mixing tokens -----------------------------------------------------
    def _mix_soft(self, h: Tensor, alpha: Tensor) -> Tensor:
        B, H, W, C = h.shape
        a = self.attn(h)
        s = self.ssm(h.reshape(B, H * W, C)).view(B, H, W, C)
        alpha = alpha.unsqueeze(-1).to(h.dtype)
        return alpha * a + (1 - alpha) * s

    def _mix_hard(self, h: Tensor, selected: Tensor, alpha: Tensor) -> Tensor:
        if self.exclusive:
            return self._mix_exclusive(h, selected)
        B, H, W, C = h.shape
        s = self.ssm(h.reshape(B, H * W, C)).reshape(B * H * W, C)
        # hard routing skips the attention of unselected patches: the selected ones are gathered,
        # which takes their number on the host (one sync; nonzero alone, its size answers "any?")
        index = selected.flatten().nonzero().squeeze(1)
        if index.numel() == 0:
            return s.view(B, H, W, C)
        a = self.attn.forward_tokens(h.reshape(B * H * W, C)[index], index, (B, H, W))
        w = alpha.reshape(-1)[index].unsqueeze(-1).to(h.dtype)
        return s.index_copy(0, index, w * a + (1 - w) * s[index]).view(B, H, W, C)

    def _mix_exclusive(self, h: Tensor, selected: Tensor) -> Tensor:
        B, H, W, C = h.shape
        flat = h.reshape(B * H * W, C)
        index = selected.flatten().nonzero().squeeze(1)  # one sync answers "none?" and "all?" too
        if index.numel() == 0:
            return self.ssm(h.reshape(B, H * W, C)).view(B, H, W, C)
        if index.numel() == flat.shape[0]:
            return self.attn(h)
        y = torch.zeros_like(flat).index_copy(0, index, self.attn.forward_tokens(flat[index], index, (B, H, W)))
        seq, valid, lengths = gather_sequences(~selected.view(B, H * W))
        tokens = h.reshape(B, H * W, C).gather(1, seq.unsqueeze(-1).expand(-1, -1, C))
        tokens = tokens * valid.unsqueeze(-1).to(h.dtype)
        out = self.ssm(tokens, lengths=lengths)
        rows = torch.arange(B, device=h.device).unsqueeze(1) * (H * W)
        return y.index_copy(0, (rows + seq)[valid], out[valid]).view(B, H, W, C)

    def _ponder_step(self, shape: tuple[int, int, int], positions: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        def step(states: Tensor, running: Tensor) -> Tensor:
            index = positions[running]
            states = states + self.ls1(self.attn.forward_tokens(self.norm1(states), index, shape))
            return states + self.ls2(self.mlp(self.norm2(states)))

        return step

    def _ponder(self, x: Tensor, ponder: Tensor) -> tuple[Tensor, Tensor]:
        """ACT on the patches where ``ponder`` is True; returns x and the mean ponder cost over
        all patches (N + R; 2 for a patch that stops after the block's own step)."""
        B, H, W, C = x.shape
        if self.act.max_steps == 1 or x.device.type == "meta":
            return x, x.new_full((), 2.0, dtype=torch.float32)
        # pondering patches attend to each other only, so they are gathered: their number is read
        # on the host (one sync, inherent to skipping the others' work)
        positions = ponder.flatten().nonzero().squeeze(1)
        if positions.numel() == 0:
            return x, x.new_full((), 2.0, dtype=torch.float32)
        flat = x.reshape(B * H * W, C)
        out, _, cost = self.act(flat.index_select(0, positions), self._ponder_step((B, H, W), positions))
        x = flat.index_copy(0, positions, out).view(B, H, W, C)
        total = cost.float().sum() + 2.0 * (B * H * W - positions.numel())
        return x, total / (B * H * W)

    def forward(self, x: Tensor, entropy: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x: (B, H, W, dim), entropy: (B, H, W) the pixel-entropy prior of each patch.

        Returns (x, α (B, H, W), ponder cost (scalar: mean N + R over the patches), attention
        fraction (scalar: share of patches with α > 0.5, or routed to attention in hard mode)).
        """
        h = self.norm1(x)
        if self.force_alpha is None:
            alpha = self.router(h, entropy)
        else:
            alpha = torch.full(x.shape[:3], self.force_alpha, dtype=h.dtype, device=x.device)
        if self.routing == "soft":
            y = self._mix_soft(h, alpha)
            routed = alpha > 0.5
            ponder = alpha > self.ponder_threshold
        else:
            routed = select_tokens(alpha.detach(), self.attention_fraction, self.threshold)
            y = self._mix_hard(h, routed, alpha)
            ponder = routed & (alpha > self.ponder_threshold)
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        x, ponder_cost = self._ponder(x, ponder)
        return x, alpha, ponder_cost, routed.float().mean()
