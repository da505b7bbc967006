"""Elastic compute of ESH-Vision: images/s with soft routing and with hard routing at forced
attention budgets, measured in one run.

Soft routing computes attention and the SSM for every patch and blends them (and ponders the
patches with α > θ). Hard routing gives each patch one path and does only that work; with
``attention_fraction`` each image sends exactly its top-k patches by α to attention (and to
ACT pondering, where α > θ) and scans the rest with the SSM. float32 eval under
``torch.inference_mode``, random weights. The routing statistics of each mode (share of patches
on attention, mean ponder cost) are printed beside the speed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from esh.bench.measure import interleaved_medians
from esh.errors import InputError

FRACTIONS = (1.0, 0.5, 0.25, 0.1, 0.0)


@dataclass
class Row:
    mode: str
    images_per_s: float
    attn_fraction: float
    ponder_cost: float


def images(kind: str, batch: int, size: int) -> torch.Tensor:
    """``noise``: standard-normal images; ``photos``: scikit-image's bundled photographs,
    resized and ImageNet-normalised, repeated to fill the batch."""
    if kind == "noise":
        return torch.randn(batch, 3, size, size)
    if kind != "photos":
        raise InputError(f"images must be 'noise' or 'photos'; got {kind!r}")
    from esh._compat import require

    data = require("skimage.data", "demo", "the photographs of the elastic-compute benchmark")
    pics = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for p in pics:
        t = torch.from_numpy(p).permute(2, 0, 1).float().div(255).unsqueeze(0)
        out.append(torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True))
    x = torch.cat(out)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.repeat((batch + len(pics) - 1) // len(pics), 1, 1, 1)[:batch].contiguous()


def run(
    model_name: str = "esh_vision_tiny",
    batch: int = 8,
    size: int = 224,
    fractions: Sequence[float] = FRACTIONS,
    kind: str = "noise",
    threads: int | None = 2,
    repeats: int = 3,
    max_seconds: float = 60.0,
    print_fn: Callable[[str], None] = print,
    exclusive_fraction: float | None = 0.25,
) -> list[Row]:
    """Time soft routing, hard routing at the router's own threshold (0.5) and hard routing at
    each forced attention fraction, one forward of each mode per round for ``repeats`` rounds
    (median per mode); print a markdown table with ratios to soft."""
    from esh.models import create_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    x = images(kind, batch, size)
    modes: list[tuple[str, dict]] = [("soft", dict(mode="soft")), ("hard, α > 0.5", dict(mode="hard"))]
    modes += [(f"hard, {100 * f:g}% attention", dict(mode="hard", attention_fraction=f)) for f in fractions]
    if exclusive_fraction is not None:  # one path per patch: the SSM scans only the unselected patches
        f = exclusive_fraction
        label = f"hard exclusive, {100 * f:g}% attention"
        modes.append((label, dict(mode="hard", attention_fraction=f, exclusive=True)))
    # modes interleaved round by round, so that load from other jobs on a shared machine
    # falls on all of them alike; each mode's time is its median over the rounds
    steps, stats = [], []
    for _, kw in modes:

        def step(kw=kw):
            model.set_routing(**kw)
            with torch.inference_mode():
                model(x)

        step()  # warm-up, and the routing statistics of this mode
        steps.append(step)
        stats.append(model.auxiliary_losses(0))
    rows = [
        Row(label, batch / t, st["attn_fraction"], st["ponder_cost"])
        for (label, _), t, st in zip(modes, interleaved_medians(steps, repeats, max_seconds), stats)
    ]
    model.set_routing("soft")
    soft = rows[0].images_per_s
    lines = [
        f"elastic compute: {model_name}, {size}x{size}, batch {batch}, {kind} images, eval float32, "
        f"{torch.get_num_threads()} threads",
        "| routing | img/s | vs soft | patches on attention | ponder cost (N + R) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.mode} | {r.images_per_s:.2f} | {r.images_per_s / soft:.2f}x | {100 * r.attn_fraction:.0f}% "
            f"| {r.ponder_cost:.3f} |"
        )
    print_fn("\n".join(lines))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="esh_vision_tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument("--images", choices=("noise", "photos"), default="noise")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)


def main_from_args(args: argparse.Namespace) -> list[Row]:
    for f in args.fractions:
        if not 0.0 <= f <= 1.0:
            raise InputError(f"--fractions must lie in [0, 1]; got {f}")
    return run(args.model, args.batch, args.img_size, args.fractions, args.images, args.threads or None, args.repeats)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    main_from_args(parser.parse_args(argv))
