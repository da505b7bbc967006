"""Reading checkpoint files that others wrote, without trusting them.

Pickled files are opened with ``torch.load(weights_only=True)``: only tensors, containers
and an explicit allow-list of classes may come out of them (``argparse.Namespace``, which
timm's CheckpointSaver and DeiT-style training scripts store as ``args``). Anything else is
refused with a message naming the class, never unpickled.
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from esh.errors import EshError, InputError

SAFE_GLOBALS: list = [argparse.Namespace]
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(InputError):
    """A checkpoint file that cannot be read or does not fit the model."""


class WeightsUnavailableError(EshError, RuntimeError):
    """Released weights could not be downloaded (offline, or no such file on the hub)."""


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in _WEIGHT_FILES:
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p} is a directory without {' or '.join(_WEIGHT_FILES)}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    return p


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw object in a ``.safetensors``, ``.pth``/``.pth.tar``/``.bin`` file, or a Hugging
    Face model directory (``model.safetensors`` or ``pytorch_model.bin`` inside)."""
    p = _resolve(path)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {p}: it contains objects outside esh's allow-list of safe classes "
            f"({', '.join(c.__module__ + '.' + c.__name__ for c in SAFE_GLOBALS)}). Original error: {e}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{p} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a dict of weights")
    return dict(obj)


def extract_state_dict(obj: Mapping, keys: tuple[str, ...] = ("state_dict", "model")) -> dict[str, Tensor]:
    """The weights in a checkpoint dict: under the first of ``keys`` present, else the dict."""
    for key in keys:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise CheckpointError(f"no tensors found in the checkpoint (top-level keys: {sorted(obj)[:10]})")
    return state


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_into(model: torch.nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error that lists what differs."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        (k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:5])})")
        if shapes:
            listing = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in shapes[:5])
            parts.append(f"{len(shapes)} shape mismatches ({listing})")
        raise CheckpointError(f"checkpoint does not fit {what}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def download_weights(cfg: dict, variant: str, cache_dir: str | None = None) -> str:
    """The released weights of ``variant`` from the Hugging Face hub (cached), or a
    WeightsUnavailableError that says how to pass a local file instead."""
    if cfg.get("hf_hub_id") is None:
        raise WeightsUnavailableError(f"{variant} has no released weights; train it with `esh train --model {variant}`")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(cfg["hf_hub_id"], cfg["hf_hub_filename"], cache_dir=cache_dir)
    except Exception as e:  # offline, no such repo, HTTP errors: all end the same way
        extra = f" (or the training file {cfg['official_filename']})" if cfg.get("official_filename") else ""
        raise WeightsUnavailableError(
            f"could not download the {variant} weights from the Hugging Face hub ({cfg['hf_hub_id']}: "
            f"{type(e).__name__}: {e}). Without network access, download {cfg['hf_hub_filename']} from "
            f"https://huggingface.co/{cfg['hf_hub_id']}{extra} elsewhere and pass it: "
            f"create_model({variant!r}, checkpoint_path='...')"
        ) from e
