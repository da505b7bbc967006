"""α-saliency: where an ESH-Vision model routes its patches to attention.

Every hybrid block of ESH-Vision blends attention (weight α) with a bidirectional Mamba path
(weight 1-α) per patch, so its α map says, block by block, which parts of the image the
model chose to spend attention on. ``alpha_maps`` runs one image through a model's
``forward_with_aux`` and upsamples every block's α map (and the mean of each stage) to the
image; ``render_saliency`` draws them over the image as heatmaps on a fixed 0..1 scale.

The image is centre-cropped to a square and given to the model through its own evaluation
transform (``esh.inference.eval_transform``) with nothing else cropped off, so the maps line
up with the square that is drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from esh._io import save_figure
from esh.devices import resolve_device
from esh.errors import InputError
from esh.inference import eval_transform, load_image

ImageLike = str | os.PathLike | Image.Image | np.ndarray

DEMO_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # in scikit-image's wheel, no download
DEMO_MODEL = "esh_vision_tiny"
UNTRAINED_NOTE = "untrained weights: the maps show the entropy prior and random routing, not learned saliency"
COLORMAP = "turbo"
OVERLAY_OPACITY = 0.6


def _in_chans(model: nn.Module) -> int:
    chans = getattr(model, "in_chans", None)
    if chans is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        chans = cfg.get("input_size", (3,))[0]
    return int(chans)


def _as_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise InputError(
                f"an image array must be (height, width), (height, width, 3) or (height, width, 4); got {image.shape}"
            )
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating) or array.min() < 0 or array.max() > 1:
                raise InputError(
                    f"an image array must be uint8, or floating point in [0, 1]; got {array.dtype} "
                    f"with values in [{array.min()}, {array.max()}]"
                )
            array = np.round(array * 255).astype(np.uint8)
        return Image.fromarray(array)
    if isinstance(image, (str, os.PathLike)):
        if not Path(image).exists():
            raise InputError(f"image {image} does not exist")
        return load_image(image)  # an InputError naming the file if it is not a readable image
    raise InputError(f"image must be a file path, a PIL image or a numpy array; got {type(image).__name__}")


def _square_crop(image: ImageLike, mode: str) -> Image.Image:
    """The centred square of side min(height, width) of the image, in ``mode`` ("L" or "RGB")."""
    pil = _as_pil(image).convert(mode)
    width, height = pil.size
    side = min(width, height)
    if side < 1:
        raise InputError(f"the image is empty ({width}x{height} pixels)")
    left, top = (width - side) // 2, (height - side) // 2
    return pil.crop((left, top, left + side, top + side))


def _upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(n, h, w) -> (n, *size), bilinear; values stay within the range of the input."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def _check_routing(model: nn.Module) -> None:
    if not callable(getattr(model, "forward_with_aux", None)):
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
        raise InputError(
            f"{name} has no α routing to show: saliency needs an ESH-Vision model, which routes patches "
            "between attention and Mamba. Train one with `esh train --model esh_vision_nano --out runs/esh` "
            "and pass --checkpoint runs/esh/best.pth (or --model esh_vision_nano for untrained weights)"
        )


def _routing_outputs(model: nn.Module, x: Tensor) -> dict:
    _check_routing(model)
    out = model.forward_with_aux(x)
    missing = [k for k in ("logits", "alphas", "ponder_cost", "block_stage") if k not in out]
    if missing:
        raise InputError(f"{type(model).__name__}.forward_with_aux returned no {', '.join(missing)}")
    if len(out["alphas"]) != len(out["block_stage"]) or not out["alphas"]:
        raise InputError(f"forward_with_aux returned {len(out['alphas'])} α maps for {len(out['block_stage'])} blocks")
    for i, alpha in enumerate(out["alphas"]):
        if alpha.ndim != 3 or alpha.shape[0] != x.shape[0]:
            raise InputError(f"α of block {i} should be (batch, height, width); got {tuple(alpha.shape)}")
    return out


def alpha_maps(
    model: nn.Module, image: ImageLike, img_size: int | None = None, min_side: int = 256, max_side: int = 1024
) -> dict[str, Any]:
    """Per-block and per-stage α maps of one image, upsampled to the image.

    Args:
        model: a model with ``forward_with_aux(x)`` returning ``logits``, ``alphas`` (one
            (batch, h_b, w_b) map per block, α ∈ [0, 1] = the share of attention per patch),
            ``ponder_cost`` and ``block_stage`` (the stage index of each block), as ESH-Vision does.
        image: a file path, a PIL image or a (H, W[, 3]) uint8 array (float arrays in [0, 1] too).
            Converted to grey or RGB as the model's ``in_chans`` asks, then centre-cropped to a
            square of side S = min(H, W): the model sees that square, and the maps are drawn on it.
        img_size: the side of the model input (default: the model's ``pretrained_cfg`` input size).
        min_side, max_side: the returned picture and maps are the square resized (bicubic) into
            this range of sides, so that small images (a 28x28 digit) still show smooth maps and
            large ones do not take gigabytes; S is that side below.

    Returns:
        a dict with
        ``image``: the square picture as a uint8 array, (S, S, 3) or (S, S) for grey models;
        ``blocks``: (num_blocks, S, S) float32, each block's α map upsampled bilinearly to S x S;
        ``stages``: (num_stages, S, S), the mean of the upsampled maps of each stage's blocks;
        ``block_stage``: the stage index of each block; ``stage_blocks``: the block indices of
        each stage; ``grids``: the (h_b, w_b) token grid of each block;
        ``block_means`` / ``stage_means``: mean α of each block / stage over the image;
        ``ponder_cost``: the model's ponder cost for the image; ``logits``: (num_classes,);
        ``input_size``: (channels, height, width) of the model input.
    The model is run in eval mode under ``torch.inference_mode`` and left in the mode it was in.
    """
    in_chans = _in_chans(model)
    if in_chans not in (1, 3):
        raise InputError(f"saliency draws grey or RGB images; the model takes {in_chans} input channels")
    crop = _square_crop(image, "L" if in_chans == 1 else "RGB")
    transform = eval_transform(model, img_size, crop_pct=1.0)  # the square is already the crop
    x = transform(crop)[None]
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = _routing_outputs(model, x.to(device))
    finally:
        model.train(was_training)

    side = min(max(crop.size[0], min_side), max_side)
    view = crop if side == crop.size[0] else crop.resize((side, side), Image.Resampling.BICUBIC)
    raw = [a[0].float().cpu() for a in out["alphas"]]
    block_stage = [int(s) for s in out["block_stage"]]
    blocks = torch.stack([_upsample(a[None], (side, side))[0] for a in raw])
    stage_ids = sorted(set(block_stage))
    stage_blocks = [[i for i, s in enumerate(block_stage) if s == stage] for stage in stage_ids]
    stages = torch.stack([blocks[idx].mean(0) for idx in stage_blocks])
    return {
        "image": np.asarray(view),
        "blocks": blocks,
        "stages": stages,
        "block_stage": block_stage,
        "stage_blocks": stage_blocks,
        "grids": [tuple(a.shape) for a in raw],
        "block_means": [float(a.mean()) for a in raw],
        "stage_means": [float(torch.stack([raw[i].mean() for i in idx]).mean()) for idx in stage_blocks],
        "ponder_cost": float(out["ponder_cost"]),
        "logits": out["logits"][0].float().cpu(),
        "input_size": tuple(x.shape[1:]),
    }


def saliency_title(
    model_name: str, maps: dict[str, Any], weights: str | None = None, class_names: Sequence[str] | None = None
) -> str:
    """The figure title: the model, which weights (``None``: untrained, and what that means for
    the picture), the mean α and ponder cost, and for trained weights the top class."""
    lines = [f"{model_name}: α-saliency"]
    if weights is None:
        lines.append(UNTRAINED_NOTE)
    else:
        stats = f"weights {weights}"
        probs = maps["logits"].softmax(-1)
        p, i = probs.max(-1)
        name = class_names[int(i)] if class_names is not None and int(i) < len(class_names) else f"class {int(i)}"
        lines.append(f"{stats}; predicted {name} ({float(p):.0%})")
    mean_alpha = float(np.mean(maps["block_means"]))
    lines.append(
        f"mean α {mean_alpha:.2f} over {len(maps['block_means'])} blocks; ponder cost {maps['ponder_cost']:.2f}"
    )
    return "\n".join(lines)


def _overlay(ax, grey: np.ndarray, alpha_map: np.ndarray, title: str) -> None:
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="antialiased")
    ax.imshow(alpha_map, cmap=COLORMAP, vmin=0.0, vmax=1.0, alpha=OVERLAY_OPACITY, interpolation="antialiased")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def _span(indices: Sequence[int]) -> str:
    a, b = indices[0] + 1, indices[-1] + 1
    return f"block {a}" if a == b else f"blocks {a}-{b}"


def render_saliency(
    image: ImageLike,
    maps: dict[str, Any],
    out: str | os.PathLike,
    title: str | None = None,
    per_block: bool = False,
    dpi: int = 100,
) -> Path:
    """Write a PNG: the image beside its per-stage α maps (and every block's map with
    ``per_block``), each overlaid on the image as a heatmap with one colour bar on a fixed
    0..1 scale. ``maps`` is what ``alpha_maps`` returned; ``image`` is normally ``maps["image"]``
    (another picture is resized to it). The file is written atomically; returns its path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError(f"saliency pictures are PNG files; got --out {out} (name it .png)")
    stages, blocks = maps["stages"], maps["blocks"]
    side = stages.shape[-1]
    picture = np.asarray(_as_pil(image).resize((side, side), Image.Resampling.BICUBIC))
    if picture.ndim == 3 and picture.shape[-1] == 4:
        picture = picture[..., :3]
    # the photo under the heatmaps in grey with half its contrast, so that neither its colours nor
    # its black and white read as α
    grey = np.asarray(Image.fromarray(picture).convert("L")) // 2 + 64

    num_stages, num_blocks = len(stages), len(blocks)
    ncols = num_stages + 1
    block_rows = math.ceil(num_blocks / ncols) if per_block else 0
    panel = 3.0 if side >= 64 else 2.4
    title_lines = 0 if not title else title.count("\n") + 1
    fig = Figure(figsize=(panel * ncols + 1.0, panel * (1 + block_rows) + 0.35 * title_lines), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1 + block_rows, ncols)
    axes = []

    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=255)
    channels, height, width = maps["input_size"]
    ax.set_title(f"input (model sees {height}x{width})", fontsize=9)
    ax.set_axis_off()
    axes.append(ax)
    for s, idx in enumerate(maps["stage_blocks"]):
        ax = fig.add_subplot(grid[0, s + 1])
        h, w = maps["grids"][idx[0]]
        label = f"stage {s + 1}: {_span(idx)}, {h}x{w} tokens\nmean α {maps['stage_means'][s]:.2f}"
        _overlay(ax, grey, stages[s].numpy(), label)
        axes.append(ax)
    for b in range(num_blocks if per_block else 0):
        ax = fig.add_subplot(grid[1 + b // ncols, b % ncols])
        h, w = maps["grids"][b]
        label = f"block {b + 1} (stage {maps['block_stage'][b] + 1}, {h}x{w})\nmean α {maps['block_means'][b]:.2f}"
        _overlay(ax, grey, blocks[b].numpy(), label)
        axes.append(ax)

    colours = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=COLORMAP)
    bar = fig.colorbar(colours, ax=axes, shrink=0.9 if block_rows else 0.8, aspect=25 if block_rows else 15)
    bar.set_label("α (attention share)")
    if title:
        fig.suptitle(title, fontsize=10)

    save_figure(fig, out, dpi=dpi, metadata={"Title": title or "", "Software": "esh saliency"})
    return out


def load_saliency_model(
    model_name: str | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    pretrained: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a model for ``alpha_maps`` (``esh.models.resolve.resolve_model``): an ``esh train``
    checkpoint supplies the model name (when ``model_name`` is None), its number of classes,
    class names, builder arguments and input size. Returns the model (eval mode, on ``device``)
    and a dict with ``name``, ``weights`` (a description, or None for untrained weights),
    ``class_names``, ``img_size``."""
    from esh.models.resolve import resolve_model

    device = resolve_device(device)
    resolved = resolve_model(model_name, checkpoint_path=checkpoint_path, pretrained=pretrained)
    model = resolved.model
    _check_routing(model)
    class_names = resolved.class_names
    if class_names is None and resolved.weights is not None and getattr(model, "num_classes", None) == 1000:
        from esh.inference import imagenet_class_names

        class_names = imagenet_class_names()
    info = {
        "name": resolved.name,
        "weights": resolved.weights,
        "class_names": class_names,
        "img_size": resolved.img_size,
    }
    return model.eval().to(device), info


def save_saliency(
    model: nn.Module,
    info: dict[str, Any],
    image: ImageLike,
    out: str | os.PathLike,
    per_block: bool = False,
    img_size: int | None = None,
) -> Path:
    """``alpha_maps`` + ``render_saliency`` with the title for the model and its weights
    (``model, info = load_saliency_model(...)``); returns the PNG's path."""
    maps = alpha_maps(model, image, img_size=img_size or info.get("img_size"))
    title = saliency_title(info["name"], maps, info.get("weights"), info.get("class_names"))
    return render_saliency(maps["image"], maps, out, title=title, per_block=per_block)


def demo_photos() -> dict[str, np.ndarray]:
    """Real photographs that ship inside scikit-image's wheel (no download): NASA's astronaut
    and SpaceX's rocket (public domain), the chelsea cat and coffee cup (CC0)."""
    from esh.errors import require

    data = require("skimage.data", "demo", "esh saliency --demo")
    return {name: getattr(data, name)() for name in DEMO_PHOTOS}


def demo(
    out_dir: str | os.PathLike = "saliency_demo",
    model_name: str | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    per_block: bool = False,
    img_size: int | None = None,
    device: str | torch.device = "cpu",
) -> list[Path]:
    """One saliency PNG per photograph of ``demo_photos()`` in ``out_dir``, with an untrained
    ``esh_vision_tiny`` (the title says so) unless a model or checkpoint is given."""
    photos = demo_photos()
    if model_name is None and checkpoint_path is None:
        model_name = DEMO_MODEL
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # untrained weights: the same pictures every time
        model, info = load_saliency_model(model_name, checkpoint_path, device=device)
    out_dir = Path(out_dir)
    return [
        save_saliency(model, info, photo, out_dir / f"saliency_{name}.png", per_block=per_block, img_size=img_size)
        for name, photo in photos.items()
    ]
