"""Training images per second of each esh vision family next to a timm model of similar
size, measured in the same run: forward, backward and an AdamW step, float32 (and bfloat16
autocast), random data at the esh model's default input size (the peer gets the same)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from esh.bench.measure import time_call
from esh.bench.vision_throughput import build

# (esh model, timm model of similar size)
PAIRS = (("mambavision_nano", "mobilenetv3_small_100"), ("mambavision_t", "convnext_tiny"))


def train_images_per_s(name: str, batch: int, size: int | None, amp: bool, repeats: int) -> tuple[float, int, int]:
    """(images/s, input size, parameters) of training ``name`` from a fresh model."""
    model = build(name).train()
    if size is None:
        size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,)) % model.num_classes

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    params = sum(p.numel() for p in model.parameters())
    return batch / time_call(step, repeats=repeats, warmup=1), size, params


def run(
    pairs: Sequence[tuple[str, str]] = PAIRS,
    batch: int = 16,
    threads: int | None = 2,
    repeats: int = 3,
    print_fn: Callable[[str], None] = print,
) -> list[tuple]:
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for ours, peer in pairs:
        size = None  # the esh model's default input size, used for its peer too
        for name in (ours, peer):
            fp32, size, params = train_images_per_s(name, batch, size, False, repeats)
            bf16, _, _ = train_images_per_s(name, batch, size, True, repeats)
            rows.append((ours, name, size, params, fp32, bf16))
    lines = [
        f"training throughput (forward + backward + AdamW step), batch {batch}, {torch.get_num_threads()} threads",
        "| family pair | model | input | params | train img/s fp32 | vs peer | train img/s bf16 autocast |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    peers = {r[0]: r[4] for r in rows if r[1] != r[0]}
    for ours, name, size, params, fp32, bf16 in rows:
        ratio = f"{fp32 / peers[ours]:.2f}x" if name == ours else "1.00x"
        lines.append(f"| {ours} | {name} | {size}² | {params / 1e6:.1f}M | {fp32:.1f} | {ratio} | {bf16:.1f} |")
    print_fn("\n".join(lines))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(batch=args.batch_size, threads=args.threads or None, repeats=args.repeats)
