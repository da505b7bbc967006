"""Time and profile training steps (forward + backward + AdamW) of vim_tiny or the tiny ESH LM:
``esh bench train-step {vim_tiny,esh_lm_tiny} [--steps N] [--threads T] [--profile]`` (or
``python benchmarks/train_step_profile.py ...``).

vim_tiny: batch 8 of random 224² images, 1000 classes. esh_lm_tiny: ``esh lm train``'s tiny
config and batch (16 blocks of 128 byte tokens). Prints the mean seconds per step over
``--steps`` steps after two warm-up steps and, with ``--profile``, torch.profiler's table of one
more step (top ops by self CPU time, with their call counts).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile


def build(name: str):
    torch.manual_seed(0)
    if name == "vim_tiny":
        import esh

        model = esh.create_model("vim_tiny", num_classes=1000)
        x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
        return model, lambda: F.cross_entropy(model(x), y)
    from esh.models.esh_lm import ESHModel, esh_tiny

    model = ESHModel(esh_tiny())
    ids = torch.randint(0, 256, (16, 128))
    return model, lambda: model(ids, labels=ids).loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=("vim_tiny", "esh_lm_tiny"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--rows", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, loss_fn = build(args.model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    print(f"{args.model}: {(time.perf_counter() - start) / args.steps:.3f} s/step ({args.threads} threads)")
    if args.profile:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
