"""esh's own training checkpoints: atomic writes, everything needed for an exact resume, and
readable back with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from esh.models._checkpoint import CheckpointError, read_checkpoint


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``: a crash
    mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def load_training_checkpoint(path: str | os.PathLike) -> dict:
    ckpt = read_checkpoint(path)
    missing = [k for k in ("model", "optimizer", "config", "epoch", "step_in_epoch") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not an esh training checkpoint (missing {', '.join(missing)})")
    return ckpt
