"""What the trainers write as they go: one row per optimizer step (``steps.csv``), one per
evaluation (``metrics.csv``, TensorBoard, wandb), and the reading of device values for them.

A training step leaves its statistics (loss, gradient norm, ...) on the device; reading one
back waits for the device to finish every queued kernel. The trainers collect a few steps'
values and read them together with ``read_floats``: one wait per log interval, not several per
step.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from esh._io import atomic_write
from esh.errors import EshError, InputError, require

LOG_KINDS = ("csv", "tensorboard", "wandb")


class DivergedError(EshError, ArithmeticError):
    """The training loss became NaN or infinite; nothing after that step is saved."""


def check_finite(rows: list[dict], key: str = "loss") -> None:
    """Stop at the first row whose ``key`` is not a finite number (read from the device already)."""
    for row in rows:
        value = row.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            where = f" at step {row['step']}" if "step" in row else ""
            raise DivergedError(
                f"training diverged: the {key} is {value}{where}; no checkpoint was written after it "
                "(lower the learning rate, or clip gradients)"
            )


def read_floats(rows: list[dict]) -> list[dict]:
    """The rows with each tensor value replaced by its Python float, all read in one copy from
    the device (the same floats as ``float(value)`` one by one)."""
    tensors = [v for row in rows for v in row.values() if torch.is_tensor(v)]
    if not tensors:
        return [dict(row) for row in rows]
    device = tensors[0].device
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    values = iter(torch.stack([t.detach().reshape(()).to(device, dtype) for t in tensors]).tolist())
    return [{k: next(values) if torch.is_tensor(v) else v for k, v in row.items()} for row in rows]


class StepLog:
    """One CSV row per optimizer step: loss, learning rate and whatever the model logs.

    Rows are appended and flushed as training goes; a resumed run first drops the rows of steps
    it is about to redo (the file is rewritten atomically), so the log stays one row per step.
    """

    def __init__(self, path: Path, done_steps: int):
        self.path = path
        self.keys: list[str] | None = None
        if path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.keys = list(reader.fieldnames or []) or None
                rows = [r for r in reader if r.get("step", "").isdigit() and int(r["step"]) <= done_steps]
            with atomic_write(path, newline="") as f:
                if self.keys:
                    w = csv.DictWriter(f, fieldnames=self.keys)
                    w.writeheader()
                    w.writerows(rows)
        self.file = open(path, "a", newline="")  # noqa: SIM115  (kept open for the run, closed by close())

    def write(self, row: dict) -> None:
        if self.keys is None:
            self.keys = list(row)
            csv.writer(self.file).writerow(self.keys)
        csv.DictWriter(self.file, fieldnames=self.keys, extrasaction="ignore").writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class MetricsLog:
    """metrics.csv always; TensorBoard or wandb on request (optional extras). One row per
    value of ``key`` (the epoch; the LM trainer logs by step): a rewritten row replaces the old."""

    def __init__(self, out: Path, kind: str, key: str = "epoch"):
        self.path = out / "metrics.csv"
        self.kind, self.key = kind, key
        self.tb = self.wandb = None
        if kind == "tensorboard":
            require("tensorboard", "tensorboard", "--log tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        elif kind == "wandb":
            self.wandb = require("wandb", "wandb", "--log wandb")
            self.wandb.init(project="esh", dir=str(out))
        elif kind not in LOG_KINDS:
            raise InputError(f"--log must be one of {', '.join(LOG_KINDS)}; got {kind!r}")

    def write(self, row: dict) -> None:
        rows = []
        if self.path.exists():
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r[self.key]) != row[self.key]]
        rows.append(row)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_write(self.path, newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        if self.tb is not None:
            for k, v in row.items():
                if k != self.key:
                    self.tb.add_scalar(k, v, row[self.key])
        if self.wandb is not None:
            self.wandb.log(row)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
