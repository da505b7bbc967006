"""Saving and loading an esh LM without transformers: a folder with ``config.json`` (the config
as a JSON object) and ``model.safetensors`` (a tied head stored once), the layout that
transformers' ``save_pretrained`` writes too.

Every file goes through ``esh._io``: written beside its target, flushed, given the permissions
of the user's umask and renamed into place, so a crash leaves either the old save or the new one.
Weights are read with ``read_checkpoint`` (safetensors, or pickles limited to tensors) and must
match the model key by key, in shape, and in kind: a non-floating tensor for a floating
parameter is refused instead of being cast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from esh._io import atomic_dir, atomic_path, write_text
from esh.errors import InputError
from esh.models._checkpoint import CheckpointError, read_checkpoint

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_weights", "read_config", "save_pretrained"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_pretrained(model: nn.Module, config_dict: dict, save_directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``save_directory``. A new folder is
    built under a temporary name and renamed into place; in an existing one each file is
    replaced atomically (weights first: ``config.json`` marks a complete save) and other files
    (a tokenizer) stay."""
    from safetensors.torch import save_file

    target = Path(save_directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as embed_tokens.weight
    config_text = json.dumps(config_dict, indent=2, sort_keys=True) + "\n"

    def write(folder: Path) -> None:
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        write_text(folder / CONFIG_NAME, config_text)

    if target.is_dir():
        write(target)
    elif target.exists():
        raise InputError(f"save_pretrained: {target} exists and is not a directory")
    else:
        with atomic_dir(target) as tmp_dir:
            write(tmp_dir)
    return target


def read_config(directory: str | os.PathLike) -> dict:
    """The JSON object in ``directory/config.json``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME} (expected a directory written by save_pretrained)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    except OSError as e:
        raise CheckpointError(f"{path} could not be read: {e.strerror or e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a {type(config).__name__}, expected a JSON object")
    return config


def load_weights(model: nn.Module, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> None:
    """Load a ``save_pretrained`` folder, a ``.safetensors`` file or an esh training checkpoint
    (weights under ``"model"``) into ``model``; every key, shape and dtype kind must fit."""
    state = read_checkpoint(path)
    if "model" in state and isinstance(state["model"], Mapping):  # an esh training checkpoint
        state = state["model"]
    tied = getattr(model.config, "tie_embeddings", False)
    if tied:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    own = model.state_dict()
    expected = {k for k in own if not (tied and k == "lm_head.weight")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: {not_tensors[0]} holds a {type(state[not_tensors[0]]).__name__}, not a tensor")
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(
            f"{path}: shape mismatch for {bad[0]} (checkpoint {tuple(state[bad[0]].shape)}, model "
            f"{tuple(own[bad[0]].shape)})"
        )
    for k, v in state.items():
        if own[k].is_floating_point() and not v.is_floating_point():
            raise CheckpointError(
                f"{path}: {k} is {v.dtype} in the checkpoint but a floating-point {own[k].dtype} parameter in "
                "the model; refusing to cast it (expected weights saved from a model)"
            )
    model.load_state_dict({k: v.to(map_location) for k, v in state.items()}, strict=False)
    model.to(map_location)
