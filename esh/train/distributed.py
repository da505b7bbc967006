"""The process set-up both trainers share: which device a process trains on, joining the
process group under ``torchrun``, and wrapping the model in DDP or FSDP2.

Under ``torchrun`` every process on a machine sees all of its GPUs; process ``LOCAL_RANK``
takes ``cuda:LOCAL_RANK`` (choose the GPUs with ``CUDA_VISIBLE_DEVICES``), so that N processes
use N GPUs instead of all crowding onto the first. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from esh.devices import resolve_device
from esh.errors import InputError


@dataclass(frozen=True)
class DistributedSetup:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0


def init_distributed(device: str | torch.device) -> DistributedSetup:
    """The device this process trains on and its place among the processes; joins the process
    group when started by torchrun (``WORLD_SIZE`` > 1). ``device`` is read by
    ``esh.devices.resolve_device`` (a device this machine lacks is a one-line error). A single
    process keeps it as given; under torchrun ``cuda`` becomes ``cuda:LOCAL_RANK`` and is made the current device."""
    import torch.distributed as dist

    device = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedSetup(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None and device.index != local_rank:
            raise InputError(
                f"under torchrun process {local_rank} of this machine trains on cuda:{local_rank}, "
                f"not {device}: give --device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        if local_rank >= torch.cuda.device_count():
            raise InputError(
                f"LOCAL_RANK {local_rank} but this machine shows {torch.cuda.device_count()} GPUs: "
                "start at most one process per GPU (--nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return DistributedSetup(device, dist.get_rank(), dist.get_world_size(), local_rank)


def close_distributed() -> None:
    """Wait for every process, then leave the process group (a no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel on this process's GPU (``device_ids=[LOCAL_RANK]``), or on the CPU."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def wrap_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: each block of the model's first ModuleList is one shard unit, then the rest. The
    shards go to the current device, which ``init_distributed`` set."""
    from torch.distributed.fsdp import fully_shard

    blocks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    for layer in blocks[0] if blocks else []:
        fully_shard(layer)
    return fully_shard(model)
