"""Seeded fuzzing of the checkpoint loaders: every damaged file ends in an EshError (one line,
no advice to turn the pickle safety off) or loads; none ends in another exception.

The files are made from small real checkpoints in every format esh reads (torch.save's zip,
the legacy pickle format, safetensors, esh training checkpoints, some with hand-edited fields)
and damaged with random bytes, truncation and bit flips. Each goes through ``read_checkpoint``,
``create_model(..., checkpoint_path=)`` and ``esh.models.load_checkpoint``.
"""

from __future__ import annotations

import argparse
import random

import pytest
import torch
from safetensors.torch import save_file

import esh
from esh.errors import EshError
from esh.models import load_checkpoint
from esh.models._checkpoint import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

VIM = dict(depth=1, embed_dim=8, img_size=32, num_classes=3, d_state=4)
CASES_PER_SOURCE = 24


def _model():
    return esh.create_model("vim_tiny", **VIM)


def _training_checkpoint(net, **edits):
    ckpt = {
        "model": net.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "config": {"model": "vim_tiny", "epochs": 1},
        "epoch": 1,
        "step_in_epoch": 0,
        "rng": {"torch": torch.get_rng_state()},
        "args": argparse.Namespace(lr=0.1),
    }
    ckpt.update(edits)
    return ckpt


def _sources(model, folder) -> dict[str, bytes]:
    """Name -> bytes of a small, valid or hand-edited checkpoint file (the suffix picks the reader)."""
    state = model.state_dict()
    files = {}

    def save(name, obj, **kw):
        path = folder / name
        torch.save(obj, path, **kw)
        files[name] = path.read_bytes()

    save("zip.pth", state)
    save("legacy.pth", {"state_dict": state}, _use_new_zipfile_serialization=False)
    save("train.pth", _training_checkpoint(model))
    save("rng_empty.pth", _training_checkpoint(model, rng={}))
    save("config_none.pth", _training_checkpoint(model, config=None, optimizer={}))
    save("model_list.pth", _training_checkpoint(model, model=[1, 2]))
    save("int_keys.pth", {1: torch.zeros(2), (2, 3): "x"})
    save("int_weights.pth", {k: v.long() if v.is_floating_point() else v for k, v in state.items()})
    save("tensor.pth", torch.zeros(3))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "w.safetensors"))
    files["w.safetensors"] = (folder / "w.safetensors").read_bytes()
    return files


def _mutations(data: bytes, rng: random.Random):
    """(label, bytes) damaged versions of ``data``."""
    yield "empty", b""
    for _ in range(CASES_PER_SOURCE // 3):
        yield "random", rng.randbytes(rng.choice([1, 7, 64, 600, len(data)]))
        cut = rng.randrange(1, len(data))
        yield f"truncated@{cut}", data[:cut]
        flipped = bytearray(data)
        for _ in range(rng.choice([1, 2, 8, 32])):
            i = rng.randrange(len(flipped))
            flipped[i] ^= 1 << rng.randrange(8)
        yield "bitflip", bytes(flipped)


def _run_loaders(path, every_loader: bool = True):
    """Each loader on ``path``: None when it loads, else the exception. The model loaders read
    the file with ``read_checkpoint`` first; where that fails they fail with it, so without
    ``every_loader`` they run only on files that it reads."""
    outcomes = []
    for i, load in enumerate(
        (
            lambda: read_checkpoint(path),
            lambda: esh.create_model("vim_tiny", checkpoint_path=str(path), **VIM),
            lambda: load_checkpoint(_model(), path, ignore_classifier=True),
        )
    ):
        if i > 0 and not every_loader and outcomes[0] is not None:
            break
        try:
            load()
            outcomes.append(None)
        except Exception as e:  # what the test is about: which exceptions escape
            outcomes.append(e)
    return outcomes


def test_damaged_checkpoints_end_in_an_esh_error(tmp_path):
    rng = random.Random(1234)
    sources = _sources(_model(), tmp_path)
    bad, files, loads = [], 0, 0
    for name, data in sorted(sources.items()):
        for label, blob in [("intact", data), *_mutations(data, rng)]:
            path = tmp_path / f"case{files}_{name}"
            path.write_bytes(blob)
            for e in _run_loaders(path, every_loader=files % 4 == 0):
                loads += 1
                if e is None:
                    continue
                message = str(e)
                if not isinstance(e, EshError):
                    bad.append(f"{name} {label}: {type(e).__name__}: {message[:200]}")
                elif "\n" in message or "weights_only" in message or message.endswith(": "):
                    bad.append(f"{name} {label}: not one clear line: {message!r}")
            path.unlink()
            files += 1
    assert files >= 250
    assert not bad, f"{len(bad)} of {loads} loads of {files} files ended badly:\n" + "\n".join(bad[:20])


def test_the_intact_sources_load(tmp_path):
    _sources(_model(), tmp_path)
    for name in ("zip.pth", "legacy.pth", "train.pth", "w.safetensors"):
        assert _run_loaders(tmp_path / name) == [None, None, None], name
