"""Images per second of esh's vision models beside timm's, measured in one run.

float32 eval under ``torch.inference_mode``, random weights, 224² by default; columns for
``channels_last`` and bfloat16 autocast; each model's multiply-adds (``esh.info``) turned into
achieved GFLOP/s next to this machine's float32 matmul peak, measured in the same run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from esh.bench.measure import time_call
from esh.info import count_model

ESH_MODELS = ("mambavision_t", "mambavision_s", "vim_tiny", "esh_vision_tiny")
TIMM_MODELS = ("convnext_tiny", "swin_tiny_patch4_window7_224", "deit_tiny_patch16_224", "deit_small_patch16_224")
# "+eager": timm's attention written out (the n x n matrix materialised), as in Vim's paper,
# beside the default fused scaled_dot_product_attention (a flash-style kernel on CPU too)
LONG_MODELS = ("vim_tiny", "deit_tiny_patch16_224", "deit_tiny_patch16_224+eager")
EAGER = "+eager"
MODES = ("fp32", "channels_last", "bf16")


def build(name: str, img_size: int | None = None) -> torch.nn.Module:
    """An esh or timm model (``esh.models.resolve.build_model``); ``img_size`` rebuilds
    position-embedded models for that size; a timm name ending in ``+eager`` writes its
    attention out."""
    from esh.models.resolve import build_model

    eager = name.endswith(EAGER)
    model = build_model(name.removesuffix(EAGER), img_size=img_size).eval()
    for m in model.modules():
        if eager and hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


def long_sequence(
    models: Sequence[str] = LONG_MODELS,
    sizes: Sequence[int] = (512, 1024),
    repeats: int = 2,
    print_fn: Callable[[str], None] = print,
) -> list[tuple]:
    """Batch-1 images/s and peak memory at large inputs (Vim's long-sequence case): the
    models are rebuilt for each size (position embeddings sized for it). Peak memory is
    measured after all timings (see esh.bench.measure.peak_memory)."""
    from esh.bench.measure import peak_memory

    rows, runs = [], []
    for size in sizes:
        for name in models:
            model = build(name, size)
            x = torch.randn(1, 3, size, size)

            def step(model=model, x=x):
                with torch.inference_mode():
                    model(x)

            tokens = (size // 16) ** 2 + 1
            rows.append([name, size, tokens, 1 / time_call(step, repeats=repeats, warmup=1), None])
            runs.append(step)
    for row, step in zip(rows, runs):
        peak = peak_memory(step)
        row[4] = None if peak is None else peak / 2**20
    lines = [
        "long sequences, batch 1, float32, inference",
        "| model | input | tokens | img/s | peak MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, size, tokens, ips, mib in rows:
        lines.append(f"| {name} | {size}² | {tokens} | {ips:.2f} | {'n/a' if mib is None else f'{mib:.0f}'} |")
    print_fn("\n".join(lines))
    return rows


def matmul_peak_gflops(n: int = 2048, repeats: int = 20) -> float:
    """float32 GEMM rate, best of ``repeats`` (the run measures it at its start and end and
    keeps the higher: a peak is what the machine can do at best)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = time_call(lambda: torch.mm(a, b), repeats=repeats, warmup=3, best=True)
    return 2 * n**3 / t / 1e9


@dataclass
class Row:
    model: str
    batch: int
    images_per_s: dict[str, float]
    gflops_per_image: float


def measure(model: torch.nn.Module, batch: int, size: int, mode: str, repeats: int, max_seconds: float) -> float:
    x = torch.randn(batch, 3, size, size)
    m = model
    if mode == "channels_last":
        m = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            m(x)

    seconds = time_call(step, repeats=repeats, warmup=1, max_seconds=max_seconds)
    if mode == "channels_last":
        model.to(memory_format=torch.contiguous_format)
    return batch / seconds


def run(
    models: Sequence[str] = ESH_MODELS + TIMM_MODELS,
    batches: Sequence[int] = (1, 8, 32),
    size: int = 224,
    modes: Sequence[str] = MODES,
    threads: int | None = 2,
    repeats: int = 3,
    max_seconds: float = 15.0,
    baseline: str = "convnext_tiny",
    print_fn: Callable[[str], None] = print,
) -> list[Row]:
    if threads:
        torch.set_num_threads(threads)
    peak = matmul_peak_gflops()
    rows = []
    for name in models:
        model = build(name)
        info = count_model(model, (3, size, size), name)
        for batch in batches:
            ips = {mode: measure(model, batch, size, mode, repeats, max_seconds) for mode in modes}
            rows.append(Row(name, batch, ips, info.total_gflops))
    peak = max(peak, matmul_peak_gflops())
    base = {r.batch: r.images_per_s["fp32"] for r in rows if r.model == baseline}
    lines = [
        f"vision throughput, {size}x{size}, eval, {torch.get_num_threads()} threads; "
        f"float32 matmul peak {peak:.0f} GFLOP/s",
        "| model | batch | GFLOPs/img | img/s fp32 | vs "
        + baseline
        + " | GFLOP/s (% of peak) |"
        + "".join(f" img/s {m} |" for m in modes if m != "fp32"),
        "|---|---:|---:|---:|---:|---:|" + "---:|" * (len(modes) - 1),
    ]
    for r in rows:
        fp32 = r.images_per_s["fp32"]
        ratio = f"{fp32 / base[r.batch]:.2f}x" if r.batch in base else ""
        achieved = fp32 * r.gflops_per_image
        extra = "".join(f" {r.images_per_s[m]:.1f} |" for m in modes if m != "fp32")
        lines.append(
            f"| {r.model} | {r.batch} | {r.gflops_per_image:.2f} | {fp32:.1f} | {ratio} "
            f"| {achieved:.0f} ({100 * achieved / peak:.0f}%) |{extra}"
        )
    print_fn("\n".join(lines))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(ESH_MODELS + TIMM_MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--long",
        nargs="+",
        type=int,
        metavar="SIZE",
        help="instead: Vim-tiny vs DeiT-tiny at these sizes (batch 1, memory)",
    )


def main_from_args(args: argparse.Namespace) -> list[Row]:
    if args.long:
        if args.threads:
            torch.set_num_threads(args.threads)
        return long_sequence(sizes=args.long)
    return run(args.models, args.batches, args.img_size, args.modes, args.threads or None, args.repeats)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    main_from_args(parser.parse_args(argv))
