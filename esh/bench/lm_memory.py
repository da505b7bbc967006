"""Peak memory of one ESH LM training step (forward, backward, AdamW step) per size, with and
without gradient checkpointing and bf16 autocast.

Each case runs in a fresh Python process so that nothing from another case is counted. On
CUDA the figure is ``torch.cuda.max_memory_allocated`` over the second step (weights, gradients,
both Adam moments and activations: everything the step holds); on CPU it is the process's peak
resident set (VmHWM, reset after the first step, which allocates the optimizer state) — that
includes the Python interpreter and torch's libraries (a few hundred MB). Cases run one at a
time: the large model needs about 8 GB for its weights and optimizer state alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Sequence

SIZES = ("small", "medium", "large")


def measure_case(size: str, checkpointing: bool, bf16: bool, batch: int, block: int, device: str) -> dict:
    """Run two training steps in this process and return the peak of the second, in bytes."""
    import torch

    from esh.models import esh_lm

    torch.manual_seed(0)
    dev = torch.device(device)
    model = esh_lm.ESHModel(getattr(esh_lm, f"esh_{size}")()).to(dev)
    model.set_grad_checkpointing(checkpointing)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, block), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        peak, kind = torch.cuda.max_memory_allocated(dev), "cuda max_memory_allocated"
    else:
        from esh.bench.measure import _status_bytes

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current resident size
        step()
        peak, kind = _status_bytes("VmHWM:"), "process peak RSS"
    return {
        "size": size,
        "checkpointing": checkpointing,
        "bf16": bf16,
        "batch": batch,
        "block": block,
        "params": model.num_parameters()["total"],
        "peak_bytes": peak,
        "measure": kind,
    }


def run(
    sizes: Sequence[str] = SIZES,
    batch: int = 1,
    block: int = 256,
    device: str | None = None,
    threads: int = 2,
    print_fn: Callable[[str], None] = print,
) -> list[dict]:
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for size, ckpt, bf16 in itertools.product(sizes, (False, True), (False, True)):
        code = (
            f"import json, torch; torch.set_num_threads({threads}); from esh.runtime import tune_cpu_allocator; "
            "tune_cpu_allocator(); from esh.bench.lm_memory import measure_case; "
            f"print(json.dumps(measure_case({size!r}, {ckpt}, {bf16}, {batch}, {block}, {device!r})))"
        )
        proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{size} checkpointing={ckpt} bf16={bf16} failed:\n{proc.stderr[-2000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print_fn(json.dumps(row))
    lines = [
        f"peak memory of one training step (AdamW), batch {batch} x {block} tokens, {device}: {rows[0]['measure']}",
        "| config | params | fp32 | bf16 autocast | fp32 + checkpointing | bf16 + checkpointing |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for size in sizes:
        cell = {(r["checkpointing"], r["bf16"]): r["peak_bytes"] / 2**30 for r in rows if r["size"] == size}
        params = next(r["params"] for r in rows if r["size"] == size)
        order = ((False, False), (False, True), (True, False), (True, True))
        lines.append(f"| esh_{size} | {params / 1e6:.1f}M | " + " | ".join(f"{cell[k]:.2f} GiB" for k in order) + " |")
    print_fn("\n".join(lines))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--threads", type=int, default=2)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(args.sizes, args.batch_size, args.block_size, args.device, args.threads)
