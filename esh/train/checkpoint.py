"""esh's own training checkpoints: every random stream a run draws from, written atomically
(``esh._io.save_torch``: a crash or a full disk leaves the previous file), and read back with
``torch.load(weights_only=True)`` and checked before a resume uses them."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping

import numpy as np
import torch

from esh._io import save_torch
from esh.models._checkpoint import CheckpointError, read_checkpoint

# the name the trainers (and tests that write checkpoints by hand) save through
atomic_save = save_torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (every device's)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device | None = None) -> dict:
    """Every random stream a training step draws from: Python's, NumPy's, torch's CPU generator
    and, when ``device`` is a CUDA device, its generator (dropout and friends draw there)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` saved (the CUDA generator too, when both have one)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate(_as_tuple(state["python"]))
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _valid_rng(state: object) -> bool:
    if not isinstance(state, Mapping) or not {"torch", "numpy", "python"} <= set(state):
        return False
    n = state["numpy"]
    return (
        torch.is_tensor(state["torch"])
        and isinstance(n, Mapping)
        and torch.is_tensor(n.get("keys"))
        and isinstance(state["python"], (tuple, list))
    )


# the entries a resume reads, and the type each must have
_ENTRIES = {
    "model": Mapping,
    "optimizer": Mapping,
    "config": Mapping,
    "epoch": int,
    "step_in_epoch": int,
}


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    """An esh training checkpoint, checked: every entry a resume reads is there with its type."""
    ckpt = read_checkpoint(path)
    missing = [k for k in _ENTRIES if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not an esh training checkpoint (missing {', '.join(missing)})")
    wrong = [k for k, kind in _ENTRIES.items() if not isinstance(ckpt[k], kind) or isinstance(ckpt[k], bool)]
    if "rng" in ckpt and not _valid_rng(ckpt["rng"]):
        wrong.append("rng")
    if wrong:
        raise CheckpointError(f"{path} is a damaged esh training checkpoint (bad {', '.join(wrong)})")
    return ckpt
