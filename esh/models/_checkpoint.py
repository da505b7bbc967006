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
import re
import warnings
from collections.abc import Mapping, Sequence
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
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} is not a regular file (a device, pipe or socket?)")
    if not os.access(p, os.R_OK):
        raise CheckpointError(f"cannot read checkpoint {p}: permission denied")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {p} is empty (0 bytes): an interrupted download or copy?")
    return p


def _reason(e: BaseException) -> str:
    """One line from an exception raised while parsing a file: torch's refusal text reduced to
    what was refused (never its advice to turn the safety off), newlines and escapes removed."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    for advice in (" Please use", "Check the documentation of torch.load"):
        text = text.split(advice, 1)[0]
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if "weights_only" in text and "False" in text:  # any remaining advice to disable the safety
        text = ""
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _refused_global(e: BaseException) -> str | None:
    """The class a weights-only unpickler refused, or None when the file is simply corrupt."""
    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    return m.group(1) if m else None


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw object in a ``.safetensors``, ``.pth``/``.pth.tar``/``.bin`` file, or a Hugging
    Face model directory (``model.safetensors`` or ``pytorch_model.bin`` inside).

    Every failure is a ``CheckpointError`` with one line: a missing, unreadable, empty or
    non-regular file, a truncated or corrupt one, a pickle holding classes outside the
    allow-list (refused, never unpickled), or a file that does not hold a dict.
    """
    p = _resolve(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except PermissionError as e:
            raise CheckpointError(f"cannot read checkpoint {p}: permission denied") from e
        except Exception as e:  # any parse failure of a corrupt header or body
            raise CheckpointError(
                f"{p} is not a readable safetensors file (truncated or corrupt?): {_reason(e)}"
            ) from e
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except PermissionError as e:
        raise CheckpointError(f"cannot read checkpoint {p}: permission denied") from e
    except Exception as e:  # random bytes reach IndexError, KeyError, AssertionError... inside torch
        refused = _refused_global(e) if isinstance(e, pickle.UnpicklingError) else None
        if refused is not None:
            allowed = ", ".join(c.__module__ + "." + c.__name__ for c in SAFE_GLOBALS)
            raise CheckpointError(
                f"refused to load {p}: it refers to {refused}, which is outside esh's allow-list of safe "
                f"classes (tensors, containers, {allowed}); esh does not unpickle other objects"
            ) from None
        raise CheckpointError(f"{p} is not a readable PyTorch checkpoint (truncated or corrupt?): {_reason(e)}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p} holds a {type(obj).__name__}, not a dict of weights")
    return dict(obj)


def extract_state_dict(obj: Mapping, keys: tuple[str, ...] = ("state_dict", "model")) -> dict[str, Tensor]:
    """The weights in a checkpoint dict: under the first of ``keys`` present, else the dict."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"the checkpoint holds a {type(obj).__name__}, not a dict of weights")
    for key in keys:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not state:
        top = sorted(str(k) for k in obj)[:10]
        raise CheckpointError(f"no tensors found in the checkpoint (top-level keys: {top})")
    return state


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


class ClassifierNote(UserWarning):
    """A checkpoint's classifier was left out and the model keeps its newly initialised head."""


def _classifier_keys(keys, classifier: str | Sequence[str]) -> set[str]:
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return {k for k in keys if any(k == n or k.startswith(n + ".") for n in names)}


def load_into(
    model: torch.nn.Module,
    state: Mapping[str, Tensor],
    what: str,
    classifier: str | Sequence[str] | None = None,
    ignore_classifier: bool = False,
) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error that lists what differs.

    ``classifier`` names the head's module(s) (``pretrained_cfg["classifier"]``). Fine-tuning:
    when the checkpoint's classifier does not fit the model's (another number of classes), its
    classifier keys alone are dropped with a one-line ``ClassifierNote`` warning and the model
    keeps its new head; every other key must fit. A model built with ``num_classes=0`` drops
    the file's classifier without a note.
    ``ignore_classifier`` drops the checkpoint's classifier keys whatever their shape.
    Integer (or bool) tensors are refused for floating-point parameters, naming the key.
    """
    own = model.state_dict()
    state = dict(state)
    keep_own: set[str] = set()
    note = None
    if classifier:
        theirs, ours = _classifier_keys(state, classifier), _classifier_keys(own, classifier)
        fits = theirs == ours and all(state[k].shape == own[k].shape for k in theirs)
        if ignore_classifier or (theirs and not fits) or (ours and not theirs):
            # a model built without a classifier (num_classes=0) drops the file's quietly
            if theirs and ours and not ignore_classifier:
                shapes = ", ".join(f"{k} {tuple(state[k].shape)}" for k in sorted(theirs))
                got = ", ".join(f"{k} {tuple(own[k].shape)}" for k in sorted(ours))
                note = f"the checkpoint's classifier ({shapes}) does not fit the model's ({got})"
            elif ours and not theirs and not ignore_classifier:
                note = "the checkpoint has no classifier"
            for k in theirs:
                del state[k]
            keep_own = ours
    missing = sorted(set(own) - set(state) - keep_own)
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
    wrong = [(k, v.dtype) for k, v in state.items() if own[k].is_floating_point() and not v.is_floating_point()]
    if wrong:
        listing = ", ".join(f"{k} ({dtype})" for k, dtype in wrong[:5])
        raise CheckpointError(
            f"checkpoint does not fit {what}: {len(wrong)} floating-point parameters hold non-floating "
            f"tensors ({listing}); integer weights would be truncated, so the file is refused"
        )
    if note:
        message = f"{what}: {note}; loaded everything else, the classifier starts new"
        warnings.warn(message, ClassifierNote, stacklevel=3)
    model.load_state_dict(state, strict=not keep_own)


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
