"""ESH-Vision's routing, measured: ``python benchmarks/esh_routing.py`` (or ``esh bench routing``).

``esh_vision_nano`` is trained on the embedded digits three ways, beside ``mambavision_nano``
and timm's ``convnext_atto`` on the same recipe:

* ``esh_off``: the routing terms off (no ponder cost, no α-variance bonus): α is shaped by the
  task loss alone;
* ``esh_design``: the design's terms for most of the run: the ponder cost off for the first
  30% of the optimizer steps, ramped up over the next 20% to 0.01, and the α-variance bonus
  (0.1) throughout;
* ``esh_budget``: ``esh_design`` plus the routing budget, pulling every block's mean α towards
  the attention fraction ``--budget`` (0.25).

For each trained ESH model: validation accuracy with soft routing and with hard routing at
attention fractions 1.0 / 0.5 / 0.25 / 0.1 / 0.0 (the top share of each image's patches by α
attends, the rest take the SSM alone), images/s of each of these modes on one validation batch
(every model and mode timed in one interleaved pass after all the training, so that the load of
other work on the machine falls on all alike),
the α histogram over the validation images (``mid_share``: the share of α in [0.1, 0.9]; a
bimodal router leaves little there), the ponder cost N + R (2 where no patch ponders), and the
correlation of α with the digits' strokes (:func:`alpha_stroke_correlation`) beside the same
figure for the untrained model of the same seed. The baselines get their accuracy and img/s.

Results go to ``OUT/results.json``, ``OUT/results.csv`` (one row per model, mode and seed) and
``OUT/pareto.png`` (accuracy against measured img/s, one curve per variant), written through
esh's atomic writers; the table is printed as markdown.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esh._io import atomic_path, save_figure, write_text
from esh.bench.measure import interleaved_medians, mean_spread
from esh.errors import InputError

FRACTIONS = (1.0, 0.5, 0.25, 0.1, 0.0)
ESH_VARIANTS = ("esh_off", "esh_design", "esh_budget")
BASELINES = ("mambavision_nano", "convnext_atto")
STROKE_THRESHOLD = 0.5


# --- α against the strokes ------------------------------------------------------------------


def stroke_share(gray: Tensor, grid: tuple[int, int], reduction: int, threshold: float = STROKE_THRESHOLD) -> Tensor:
    """The share of stroke pixels (``gray > threshold``) under each token of a ``grid`` whose
    tokens cover ``reduction`` x ``reduction`` pixels from the top-left corner (the image padded
    with background at the bottom and right, as ESH-Vision pads). gray: (B, H, W) in [0, 1] ->
    (B, h, w) in [0, 1]."""
    h, w = grid
    mask = (gray > threshold).float()[:, None]
    pad_h, pad_w = h * reduction - mask.shape[-2], w * reduction - mask.shape[-1]
    if pad_h < 0 or pad_w < 0:
        raise InputError(f"a {h}x{w} grid of {reduction}-pixel tokens does not cover a {tuple(gray.shape[-2:])} image")
    mask = F.pad(mask, (0, pad_w, 0, pad_h))
    return F.avg_pool2d(mask, reduction)[:, 0]


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two equally sized tensors (flattened); NaN where either is constant."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = a.norm() * b.norm()
    return float((a @ b) / den) if den > 0 else math.nan


def alpha_stroke_correlation(
    alphas: Sequence[Tensor],
    block_stage: Sequence[int],
    gray: Tensor,
    patch_size: int = 4,
    threshold: float = STROKE_THRESHOLD,
) -> dict:
    """How closely α follows the strokes: per block, the Pearson correlation over every token of
    every image between α and the token's share of stroke pixels (:func:`stroke_share`, at that
    block's token grid, ``patch_size * 2**stage`` pixels a side).

    alphas: one (B, h_b, w_b) map per block; gray: (B, H, W) images in [0, 1] (strokes bright).
    Returns ``blocks`` (one r per block, NaN where the stroke share is constant at that grid),
    ``stage0`` (the mean r of the first stage's blocks, the finest grid) and ``mean`` (the mean r
    over the blocks where it is defined)."""
    if len(alphas) != len(block_stage):
        raise InputError(f"{len(alphas)} α maps for {len(block_stage)} blocks")
    rs = []
    for alpha, stage in zip(alphas, block_stage):
        share = stroke_share(gray, tuple(alpha.shape[-2:]), patch_size * 2 ** int(stage), threshold)
        rs.append(pearson(alpha, share))
    first = [r for r, s in zip(rs, block_stage) if s == min(block_stage) and not math.isnan(r)]
    defined = [r for r in rs if not math.isnan(r)]
    return {
        "blocks": rs,
        "stage0": statistics.fmean(first) if first else math.nan,
        "mean": statistics.fmean(defined) if defined else math.nan,
    }


def _gray(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The first channel of normalised images back in [0, 1]."""
    return (x[:, 0] * std[0] + mean[0]).clamp(0, 1)


# --- training and evaluation ----------------------------------------------------------------


def variant_settings(variant: str, budget: float) -> dict:
    """The VisionTrainConfig settings of each model of the experiment."""
    if variant == "esh_off":
        return dict(model="esh_vision_nano", ponder_weight=0.0, alpha_var_weight=0.0)
    design = dict(model="esh_vision_nano", ponder_warmup=0.3, ponder_ramp=0.2, ponder_weight=0.01, alpha_var_weight=0.1)
    if variant == "esh_design":
        return design
    if variant == "esh_budget":
        return dict(design, routing_budget=budget, routing_budget_weight=1.0)
    if variant in BASELINES:
        return dict(model=variant)
    raise InputError(f"unknown variant {variant!r}: {', '.join((*ESH_VARIANTS, *BASELINES))}")


def _subset_npz(path: Path, limit: int, seed: int) -> Path:
    """``limit`` images of the embedded digits, the same share of every class, as an .npz."""
    from esh.data.datasets import DIGITS_FILE, load_npz

    images, labels, names = load_npz(DIGITS_FILE)
    rng = np.random.default_rng(seed)
    per = max(1, limit // len(names))
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in range(len(names))]))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, images=images[keep], labels=labels[keep])
    return path


def _val_batches(trainer, limit: int | None) -> list[tuple[Tensor, Tensor]]:
    out, seen = [], 0
    for x, y in trainer.val_loader:
        out.append((x, y))
        seen += len(x)
        if limit and seen >= limit:
            break
    return out


def _accuracy(model: nn.Module, batches, routing: dict | None) -> tuple[float, list]:
    """Top-1 accuracy (%) and, per batch, the model's routing statistics."""
    if routing is not None:
        model.set_routing(**routing)
    correct = total = 0
    stats = []
    with torch.inference_mode():
        for x, y in batches:
            logits = model(x)
            correct += int((logits.argmax(-1) == y).sum())
            total += len(y)
            if routing is not None:
                stats.append(model.auxiliary_losses(0))
    return 100.0 * correct / max(total, 1), stats


def throughputs(cases: Sequence[tuple[nn.Module, dict | None]], x: Tensor, repeats: int) -> list[float]:
    """Images/s of each (model, routing mode) on batch ``x``: every case once per round, rounds
    repeated ``repeats`` times, each case's median, so the load of other jobs on a shared machine
    falls on all cases alike."""
    steps = []
    for model, routing in cases:

        def step(model=model, routing=routing):
            if routing is not None:
                model.set_routing(**routing)
            with torch.inference_mode():
                model(x)

        model.eval()
        step()
        steps.append(step)
    return [len(x) / t for t in interleaved_medians(steps, repeats)]


def _esh_modes(fractions: Sequence[float]) -> list[tuple[str, dict]]:
    return [("soft", dict(mode="soft"))] + [(f"hard {f:g}", dict(mode="hard", attention_fraction=f)) for f in fractions]


def evaluate(
    model: nn.Module,
    variant: str,
    batches,
    fractions: Sequence[float],
    mean_std: tuple,
    untrained: nn.Module | None = None,
) -> list[dict]:
    """The rows of one trained model: one per routing mode (one for a baseline), each with the
    mode's ``routing`` (None for a baseline) for the throughput pass, which fills ``images_per_s``."""
    model.eval()
    if not hasattr(model, "set_routing"):
        acc, _ = _accuracy(model, batches, None)
        return [dict(variant=variant, mode="-", fraction=None, val_acc=acc, routing=None)]
    rows = []
    for label, kw in _esh_modes(fractions):
        acc, stats = _accuracy(model, batches, kw)
        rows.append(
            dict(
                variant=variant,
                mode=label,
                fraction=kw.get("attention_fraction"),
                val_acc=acc,
                routing=kw,
                attn_fraction=statistics.fmean(s["attn_fraction"] for s in stats),
                ponder_cost=statistics.fmean(s["ponder_cost"] for s in stats),
            )
        )
    # α over the validation images with soft routing: histogram, and how it follows the strokes
    soft = rows[0]
    alphas, corr, corr0 = [], [], []
    model.set_routing("soft")
    with torch.inference_mode():
        for x, _ in batches:
            out = model.forward_with_aux(x)
            alphas.append(torch.cat([a.reshape(-1) for a in out["alphas"]]))
            corr.append(alpha_stroke_correlation(out["alphas"], out["block_stage"], _gray(x, *mean_std)))
            if untrained is not None:
                u = untrained.forward_with_aux(x)
                corr0.append(alpha_stroke_correlation(u["alphas"], u["block_stage"], _gray(x, *mean_std)))
    every = torch.cat(alphas).float().numpy()
    soft["alpha_hist"] = np.histogram(every, bins=10, range=(0.0, 1.0))[0].tolist()
    soft["alpha_mean"] = float(every.mean())
    soft["mid_share"] = float(((every >= 0.1) & (every <= 0.9)).mean())
    soft["stroke_r"] = statistics.fmean(c["mean"] for c in corr)
    soft["stroke_r_stage0"] = statistics.fmean(c["stage0"] for c in corr)
    if corr0:
        soft["stroke_r_untrained"] = statistics.fmean(c["mean"] for c in corr0)
        soft["stroke_r_stage0_untrained"] = statistics.fmean(c["stage0"] for c in corr0)
    return rows


def run(
    out: str | Path = "runs/esh_routing",
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 8,
    img_size: int = 56,
    batch_size: int = 64,
    limit: int | None = None,
    val_limit: int | None = None,
    fractions: Sequence[float] = FRACTIONS,
    budget: float = 0.25,
    variants: Sequence[str] = (*ESH_VARIANTS, *BASELINES),
    threads: int | None = 2,
    repeats: int = 3,
    print_fn: Callable[[str], None] = print,
) -> list[dict]:
    """Train and evaluate every variant for every seed; write the results and the plot; print
    the table. ``limit``: train on a class-balanced subset of that many digits (80% train, 20%
    validation) instead of the fixed 4,000 / 1,000 split; ``val_limit``: evaluate on the first
    that many validation images."""
    from esh.models import create_model
    from esh.train import VisionTrainConfig, VisionTrainer

    if threads:
        torch.set_num_threads(threads)
    for v in variants:
        variant_settings(v, budget)  # an unknown name fails before any training
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = "digits" if not limit else str(_subset_npz(out / f"digits_{limit}.npz", limit, 0))
    rows: list[dict] = []
    cases: list[tuple[nn.Module, dict | None]] = []  # (trained model, routing) of each row, for the timing
    timing_x = None
    for seed in seeds:
        for variant in variants:
            cfg = VisionTrainConfig(
                data=data,
                img_size=img_size,
                batch_size=batch_size,
                epochs=epochs,
                seed=seed,
                out=str(out / variant / f"seed{seed}"),
                progress=False,
                **variant_settings(variant, budget),
            )
            start = time.perf_counter()
            trainer = VisionTrainer(cfg)
            trainer.fit()
            train_s = time.perf_counter() - start
            batches = _val_batches(trainer, val_limit)
            if timing_x is None:
                timing_x = batches[0][0]
            untrained = None
            if variant.startswith("esh"):
                torch.manual_seed(seed)
                untrained = create_model("esh_vision_nano", num_classes=trainer.num_classes).eval()
            mean_std = _mean_std(trainer.model)
            for row in evaluate(trainer.model, variant, batches, fractions, mean_std, untrained):
                cases.append((trainer.model, row.pop("routing")))
                rows.append(dict(row, seed=seed, train_s=train_s, steps=trainer.global_step))
            print_fn(f"{variant} seed {seed}: trained {trainer.global_step} steps in {train_s:.0f} s")
    # every trained model in every mode timed in one interleaved pass on the same batch, so the
    # img/s of different variants are comparable on a machine shared with other work
    for row, ips in zip(rows, throughputs(cases, timing_x, repeats)):
        row["images_per_s"] = ips
    meta = dict(
        seeds=list(seeds),
        epochs=epochs,
        img_size=img_size,
        batch_size=batch_size,
        limit=limit,
        val_limit=val_limit,
        budget=budget,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    write_text(out / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    write_text(out / "results.csv", _csv(rows))
    plot(rows, out / "pareto.png")
    print_fn(format_table(rows, meta))
    return rows


def _mean_std(model: nn.Module) -> tuple:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


CSV_FIELDS = (
    "variant",
    "seed",
    "mode",
    "fraction",
    "val_acc",
    "images_per_s",
    "attn_fraction",
    "ponder_cost",
    "alpha_mean",
    "mid_share",
    "stroke_r",
    "stroke_r_untrained",
    "stroke_r_stage0",
    "stroke_r_stage0_untrained",
    "steps",
    "train_s",
)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _group(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["mode"]), []).append(r)
    return groups


def format_table(rows: list[dict], meta: dict) -> str:
    """Markdown: one line per variant and routing mode (mean ± standard deviation over seeds)."""
    lines = [
        f"esh routing: {meta['img_size']}x{meta['img_size']} digits, {meta['epochs']} epochs, batch "
        f"{meta['batch_size']}, seeds {meta['seeds']}, {meta['threads']} threads"
        + (f", {meta['limit']}-image subset" if meta.get("limit") else ""),
        "| model | routing | val acc % | img/s | on attention % | ponder N+R | α in [0.1, 0.9] "
        "| r(α, strokes) all blocks: trained (untrained) | first stage: trained (untrained) |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]

    def r_cell(group: list[dict], key: str) -> str:
        trained, untrained = (
            mean_spread([g.get(key) for g in group], 3),
            mean_spread([g.get(key + "_untrained") for g in group], 3),
        )
        if trained == "-":
            return ""
        return trained + (f" ({untrained})" if untrained != "-" else "")

    for (variant, mode), group in _group(rows).items():
        lines.append(
            f"| {variant} | {mode} | {mean_spread([g['val_acc'] for g in group], 1)} "
            f"| {mean_spread([g['images_per_s'] for g in group], 0)} "
            f"| {mean_spread([100 * g['attn_fraction'] for g in group if 'attn_fraction' in g], 0)} "
            f"| {mean_spread([g.get('ponder_cost') for g in group], 3)} "
            f"| {mean_spread([g.get('mid_share') for g in group], 2)} "
            f"| {r_cell(group, 'stroke_r')} | {r_cell(group, 'stroke_r_stage0')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against measured img/s, one curve per ESH variant through its hard-routing
    fractions (soft routing as a hollow marker), one point per baseline; seed means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_variant: dict[str, list] = {}
    for (variant, mode), group in _group(rows).items():
        point = (
            statistics.fmean(g["images_per_s"] for g in group),
            statistics.fmean(g["val_acc"] for g in group),
            mode,
        )
        by_variant.setdefault(variant, []).append(point)
    for variant, points in by_variant.items():
        hard = sorted((p for p in points if p[2].startswith("hard")), key=lambda p: p[0])
        soft = [p for p in points if p[2] in ("soft", "-")]
        if hard:
            line = ax.plot([p[0] for p in hard], [p[1] for p in hard], "o-", label=f"{variant} (hard)")[0]
            for p in hard:
                ax.annotate(p[2].split()[-1], (p[0], p[1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if soft:
                ax.plot([soft[0][0]], [soft[0][1]], "o", mfc="none", color=line.get_color(), label=f"{variant} (soft)")
        elif soft:
            ax.plot([soft[0][0]], [soft[0][1]], "s", ms=8, label=variant)
    ax.set(xlabel="measured images/s (eval, float32, CPU)", ylabel="validation accuracy (%)")
    ax.set_title("accuracy vs throughput; labels: attention fraction of hard routing", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/esh_routing", help="output directory")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=56)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--limit", type=int, default=0, help="train on a class-balanced subset of N digits, 80/20 (0: all 5,000)"
    )
    parser.add_argument("--val-limit", type=int, default=0, help="evaluate on the first N validation images (0: all)")
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument("--budget", type=float, default=0.25, help="attention fraction of the esh_budget variant")
    parser.add_argument("--variants", nargs="+", default=[*ESH_VARIANTS, *BASELINES])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds per routing mode")


def main_from_args(args: argparse.Namespace) -> list[dict]:
    for f in (*args.fractions, args.budget):
        if not 0.0 <= f <= 1.0:
            raise InputError(f"--fractions and --budget are attention fractions in [0, 1]; got {f}")
    if args.limit and args.limit < 100:
        raise InputError(f"--limit must be 0 (all) or at least 100 images; got {args.limit}")
    return run(
        args.out,
        args.seeds,
        args.epochs,
        args.img_size,
        args.batch_size,
        args.limit or None,
        args.val_limit or None,
        args.fractions,
        args.budget,
        args.variants,
        args.threads or None,
        args.repeats,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    main_from_args(parser.parse_args(argv))
