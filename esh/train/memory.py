"""Block checkpointing when memory needs it: the activations a training step saves for its
backward, measured on a two-image forward, against the memory the device has free.

Checkpointing recomputes every block's forward in the backward; for ESH-Vision that costs
about 40% of a CPU training step (measured in the README), so the trainer's default for the
models that ask for it (``default_grad_checkpointing = True``) is to checkpoint only where the
activations would not fit comfortably: ``needs_grad_checkpointing``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

__all__ = ["available_memory", "needs_grad_checkpointing", "saved_activation_bytes"]

# checkpoint when the step's saved activations would take more than this share of the free memory
MEMORY_SHARE = 0.5


def saved_activation_bytes(model: nn.Module, example: Tensor) -> int:
    """Bytes autograd keeps for the backward of ``model(example)`` in its current mode, each
    storage counted once and the parameters left out. The model's buffers (BatchNorm's running
    statistics) and the random streams are restored afterwards, so the measurement changes
    nothing about the run that follows."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and t.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    devices = [example.device] if example.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(example)
    del out
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return sum(seen.values())


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this process's tensors: the GPU's free memory, or the host's available
    memory (Linux's MemAvailable, else the free physical pages); None where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def needs_grad_checkpointing(
    model: nn.Module, example: Tensor, batch_size: int, share: float = MEMORY_SHARE
) -> tuple[bool, str]:
    """(checkpoint?, why) for training ``model`` on batches of ``batch_size`` inputs like
    ``example`` (a batch of two on the training device): True when the saved activations,
    measured on ``example`` and scaled to the batch, exceed ``share`` of the free memory, or when
    the free memory cannot be read."""
    free = available_memory(example.device)
    if free is None:
        return True, f"free memory on {example.device.type} unknown"
    need = saved_activation_bytes(model, example) * batch_size / example.shape[0]
    gib = 2**30
    why = f"activations ~{need / gib:.2f} GiB of {free / gib:.1f} GiB free"
    return need > share * free, why
