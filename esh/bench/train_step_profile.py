"""Time and profile training steps (forward + backward + AdamW) of one model:
``esh bench train-step {vim_tiny,esh_vision_tiny,esh_vision_nano,esh_lm_tiny} [--steps N]
[--threads T] [--grad-checkpointing] [--profile]`` (or ``python benchmarks/train_step_profile.py ...``).

vim_tiny, esh_vision_tiny: batch 8 of random 224² images, 1000 classes. esh_vision_nano: the
main job's batch, 64 random 56² images, 10 classes, with the routing terms the trainer adds.
esh_lm_tiny: ``esh lm train``'s tiny config and batch (16 blocks of 128 byte tokens). Prints the
mean seconds per step over ``--steps`` steps after two warm-up steps and, with ``--profile``,
torch.profiler's table of one more step (top ops by self CPU time, with their call counts).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

MODELS = ("vim_tiny", "esh_vision_tiny", "esh_vision_nano", "esh_lm_tiny")


def build(name: str, grad_checkpointing: bool = False):
    torch.manual_seed(0)
    if name != "esh_lm_tiny":
        import esh

        nano = name == "esh_vision_nano"
        classes, batch, size = (10, 64, 56) if nano else (1000, 8, 224)
        model = esh.create_model(name, num_classes=classes)
        model.set_grad_checkpointing(grad_checkpointing)
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))
        if not hasattr(model, "auxiliary_losses"):
            return model, lambda: F.cross_entropy(model(x), y)

        def loss_fn():
            loss = F.cross_entropy(model(x), y)
            terms = model.auxiliary_losses(step=0)
            return loss + sum(v for k, v in terms.items() if k.startswith("loss_"))

        return model, loss_fn
    from esh.models.esh_lm import ESHModel, esh_tiny

    model = ESHModel(esh_tiny())
    ids = torch.randint(0, 256, (16, 128))
    return model, lambda: model(ids, labels=ids).loss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grad-checkpointing", action="store_true", help="block checkpointing (vision models)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--rows", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, loss_fn = build(args.model, args.grad_checkpointing)
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
