"""The trainer, its data, checkpoints and exact resume."""

from __future__ import annotations

import csv
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from digits_npz import small_npz as _small_npz
from PIL import Image

import esh
from esh.cli import main
from esh.data.datasets import DIGITS_FILE, build_datasets, stratified_split
from esh.models._checkpoint import CheckpointError
from esh.train import VisionTrainConfig, VisionTrainer, train
from esh.train.checkpoint import atomic_save


def test_embedded_digits_split_is_stratified_and_stable():
    train_set, val_set, names = build_datasets("digits")
    assert (len(train_set), len(val_set), names) == (4000, 1000, [str(i) for i in range(10)])
    assert np.bincount(train_set.labels).tolist() == [400] * 10
    assert np.bincount(val_set.labels).tolist() == [100] * 10
    again, _, _ = build_datasets("digits")
    assert np.array_equal(train_set.images, again.images)
    with np.load(DIGITS_FILE) as f:
        _, va = stratified_split(f["labels"], 0.2, seed=0)
    assert va[:5].tolist() == sorted(va.tolist())[:5]  # indices are sorted and fixed by the seed


def _cfg(tmp_path, **kw):
    data = _small_npz(tmp_path / "small.npz")
    base = dict(data=str(data), batch_size=8, epochs=2, out=str(tmp_path / "run"), progress=False, warmup_epochs=0.5)
    return VisionTrainConfig(**{**base, **kw})


def test_a_few_epochs_lower_the_training_loss(tmp_path):
    trainer = VisionTrainer(_cfg(tmp_path, epochs=4, lr=3e-3))
    trainer.fit()
    losses = [row["train_loss"] for row in trainer.history]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]


def test_outputs_and_the_checkpoint_loads_through_create_model(tmp_path):
    result = train(_cfg(tmp_path))
    out = tmp_path / "run"
    for name in ("best.pth", "last.pth", "metrics.csv", "config.json", "curves.png"):
        assert (out / name).is_file(), name
    assert 0 <= result["best_val_acc"] <= 100
    model = esh.create_model("mambavision_nano", num_classes=4, checkpoint_path=str(out / "best.pth"))
    state = torch.load(out / "best.pth", weights_only=True)["model"]
    torch.testing.assert_close(model.state_dict()["head.weight"], state["head.weight"])


def _run_cli(args, env_threads="2"):
    env = {**os.environ, "OMP_NUM_THREADS": env_threads, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "esh", "train", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


@pytest.mark.slow
def test_a_run_killed_at_any_point_resumes_to_the_same_weights(tmp_path):
    data = _small_npz(tmp_path / "small.npz")
    common = ["--data", str(data), "--batch-size", "8", "--epochs", "3", "--save-every", "1", "--seed", "3"]
    full = _run_cli([*common, "--out", str(tmp_path / "full")])
    assert full.wait(timeout=300) == 0, full.stderr.read().decode()[-2000:]

    killed = _run_cli([*common, "--out", str(tmp_path / "killed")])
    last = tmp_path / "killed" / "last.pth"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.0, 0.4))
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert last.exists()
    step = torch.load(last, weights_only=True)["global_step"]

    resumed = _run_cli(["--resume", str(tmp_path / "killed")])
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    a = torch.load(tmp_path / "full" / "last.pth", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] > step
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6, msg=k)


def test_corrupt_checkpoint_is_a_clear_error_and_a_failed_save_keeps_the_last_good_one(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, max_steps=2, epochs=1)
    train(cfg)
    last = tmp_path / "run" / "last.pth"
    good = last.read_bytes()

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"x": 1}, last)
    monkeypatch.undo()
    assert last.read_bytes() == good and not list(last.parent.glob(".*tmp*"))

    last.write_bytes(good[: len(good) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train(resume=str(tmp_path / "run"))


def test_bad_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not 'digits'"):
        train(VisionTrainConfig(data=str(tmp_path / "missing"), progress=False))
    (tmp_path / "d" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="train/ and val/"):
        train(VisionTrainConfig(data=str(tmp_path / "d"), progress=False))
    with pytest.raises(ValueError, match="4 classes but num_classes=2"):
        train(_cfg(tmp_path, num_classes=2))


def test_auxiliary_losses_hook_is_added_and_logged(tmp_path, monkeypatch):
    trainer = VisionTrainer(_cfg(tmp_path))
    calls = []

    def aux(step):
        calls.append(step)
        return {"loss_extra": torch.tensor(0.5), "alpha_mean": torch.tensor(0.25), "ponder_cost": 1.5}

    trainer.model.auxiliary_losses = aux
    trainer.global_step = 7
    logits = torch.randn(2, 4)
    targets = torch.tensor([0, 1])
    loss, logged = trainer._loss(logits, targets)
    plain = trainer.criterion(logits, targets)
    assert float(loss) == pytest.approx(float(plain) + 0.5)
    assert logged == {"loss_extra": 0.5, "alpha_mean": 0.25, "ponder_cost": 1.5}
    assert calls == [7]  # the hook is told how many optimizer steps are done (loss schedules)


def test_model_statistics_are_logged_per_step_and_resume_keeps_one_row_per_step(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, out=str(out), max_steps=3, epochs=1)
    trainer = VisionTrainer(cfg)
    trainer.model.auxiliary_losses = lambda step: {"alpha_mean": torch.tensor(0.1 * step)}
    trainer.fit()
    with open(out / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [float(r["alpha_mean"]) for r in rows] == pytest.approx([0.0, 0.1, 0.2])
    assert all(float(r["loss"]) > 0 and float(r["lr"]) > 0 for r in rows)
    # a run resumed from step 2 redoes step 3: the log keeps one row for it
    trainer = VisionTrainer(cfg)
    trainer.resume(out / "last.pth")
    trainer.global_step = 2
    trainer.fit()
    with open(out / "steps.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_models_that_ask_for_gradient_checkpointing_get_it_when_memory_needs_it(tmp_path, monkeypatch):
    from esh.models import mambavision
    from esh.train import memory

    monkeypatch.setattr(mambavision.MambaVision, "default_grad_checkpointing", True, raising=False)
    # plenty of memory for a small model on small images: no recomputation
    trainer = VisionTrainer(_cfg(tmp_path))
    assert not trainer.model.grad_checkpointing and "GiB free" in trainer.grad_checkpointing_reason
    # little free memory, or none known: checkpointing
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**20)
    assert VisionTrainer(_cfg(tmp_path)).model.grad_checkpointing
    monkeypatch.setattr(memory, "available_memory", lambda device: None)
    assert VisionTrainer(_cfg(tmp_path)).model.grad_checkpointing
    # asked for explicitly, either way
    assert not VisionTrainer(_cfg(tmp_path, grad_checkpointing=False)).model.grad_checkpointing
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**50)
    assert VisionTrainer(_cfg(tmp_path, grad_checkpointing=True)).model.grad_checkpointing
    monkeypatch.setattr(mambavision.MambaVision, "default_grad_checkpointing", False, raising=False)
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**20)
    assert not VisionTrainer(_cfg(tmp_path)).model.grad_checkpointing


def test_model_arguments_reach_the_builder(tmp_path):
    trainer = VisionTrainer(_cfg(tmp_path, model_kwargs={"drop_path_rate": 0.2}))
    rates = [m.drop_prob for m in trainer.model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)


def test_cli_model_arguments_are_parsed_and_bad_ones_rejected(capsys):
    from esh.cli import parse_model_args as _parse_model_args

    assert _parse_model_args(["drop_path_rate=0.1", "name=abc", "flag=True"]) == {
        "drop_path_rate": 0.1,
        "name": "abc",
        "flag": True,
    }
    assert main(["train", "--model-arg", "no-equals-sign", "--smoke-test"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_cli_trains_on_an_image_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (tmp_path / "data" / "train" / "a" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    code = main(["train", "--data", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "4", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert "best validation accuracy" in printed.out
    # the command shows esh's warnings as one line: esh train: note: ...
    assert re.search(r"esh train: note: .*skipping unreadable image .*broken.png", printed.err)
    assert (out / "best.pth").is_file() and (out / "curves.png").is_file()


@pytest.mark.slow
def test_torchrun_with_two_processes_matches_one_process(tmp_path):
    # a model without BatchNorm and no random augmentation: the two runs see the same global
    # batches, and DDP's averaged gradients equal the one-process gradients. SGD, because
    # Adam's first steps turn float-rounding differences in near-zero gradients into
    # lr-sized ones (with AdamW the weights still agree to 4e-5 after 4 steps)
    data = _small_npz(tmp_path / "small.npz")
    common = [
        "train",
        "--model",
        "deit_tiny_patch16_224",
        "--img-size",
        "32",
        "--data",
        str(data),
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--max-steps",
        "4",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--no-aug",
        "--seed",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one = subprocess.run(
        [sys.executable, "-m", "esh", *common, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "-m",
            "esh",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "last.pth", weights_only=True)
    b = torch.load(tmp_path / "two" / "last.pth", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=1e-6, msg=k)


def test_a_hugging_face_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    with np.load(DIGITS_FILE) as f:
        keep = np.concatenate([np.flatnonzero(f["labels"] == c)[:10] for c in range(3)])
        images, labels = f["images"][keep], f["labels"][keep]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["zero", "one", "two"])}
    )
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(i) for i in images], "label": labels.tolist()}, features=features
    )
    ds.save_to_disk(str(tmp_path / "hfds"))
    train_set, val_set, names = build_datasets(f"hf:{tmp_path / 'hfds'}")
    assert names == ["zero", "one", "two"] and len(train_set) + len(val_set) == 30
    result = train(
        VisionTrainConfig(
            data=f"hf:{tmp_path / 'hfds'}", epochs=1, batch_size=4, out=str(tmp_path / "run"), progress=False
        )
    )
    assert 0 <= result["final_val_acc"] <= 100


def test_adamw8bit_without_bitsandbytes_says_how_to_install(tmp_path):
    if esh._compat.has_module("bitsandbytes"):
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(ImportError, match=r"esh\[bnb\]"):
        VisionTrainer(_cfg(tmp_path, optimizer="adamw8bit"))


def test_eval_uses_the_training_data_pipeline(tmp_path, capsys):
    train(_cfg(tmp_path, epochs=1, max_steps=3))
    ckpt = tmp_path / "run" / "best.pth"
    args = ["eval", "--model", "mambavision_nano", "--checkpoint", str(ckpt), "--num-classes", "4"]
    assert main([*args, "--data", str(tmp_path / "small.npz"), "--batch-size", "16"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_the_training_options_run_together(tmp_path):
    cfg = _cfg(
        tmp_path,
        epochs=1,
        max_steps=2,
        mixup=0.8,
        cutmix=1.0,
        ema=True,
        grad_accum=2,
        amp=True,
        channels_last=True,
        grad_checkpointing=True,
        randaug="rand-m9-mstd0.5",
        re_prob=0.25,
        optimizer="lamb",
    )
    result = train(cfg)
    history = torch.load(tmp_path / "run" / "last.pth", weights_only=True)["history"]
    assert "val_acc_ema" in history[-1] and result["final_val_acc"] >= 0


@pytest.mark.parametrize("log_interval, reads", [(1, 5), (3, 2)])
def test_losses_are_read_from_the_device_once_per_log_interval(tmp_path, monkeypatch, log_interval, reads):
    import sys

    from esh.train.trainer import EpochSampler

    trainer = VisionTrainer(_cfg(tmp_path, epochs=1, max_steps=5, log_interval=log_interval))
    losses = []
    criterion = trainer.criterion
    trainer.criterion = lambda logits, targets: losses.append(criterion(logits, targets)) or losses[-1]
    trainer.step_log = _StepRows()
    calls = []  # tensor -> Python conversions (each one waits for the device) made by esh.train's code
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            caller = sys._getframe(1)
            on_device = caller.f_code is not EpochSampler.__iter__.__code__  # the order of the data is on the host
            if on_device and caller.f_globals.get("__name__", "").startswith("esh.train"):
                calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    row = trainer.train_epoch()
    monkeypatch.undo()
    assert calls == ["tolist"] * reads  # one read of all the pending steps' values at a time
    step_losses = [float(loss) for loss in losses]
    assert [r["step"] for r in trainer.step_log.rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in trainer.step_log.rows] == pytest.approx(step_losses, rel=1e-6)
    # the epoch's loss is still the mean of the step losses (equal batches)
    assert row["train_loss"] == pytest.approx(sum(step_losses) / len(step_losses), rel=1e-6)


class _StepRows:
    def __init__(self):
        self.rows = []

    def write(self, row):
        self.rows.append(row)


def test_vim_trains_and_evaluates_at_the_size_asked_for(tmp_path):
    """``--img-size`` builds Vim for that size (its position embedding has one row per patch
    of that size); the checkpoint records it, so eval runs at the training size by itself."""
    from esh.models.resolve import resolve_model

    cfg = _cfg(tmp_path, model="vim_tiny", img_size=32, epochs=1, max_steps=1, model_kwargs={"depth": 2})
    result = train(cfg)
    resolved = resolve_model(checkpoint_path=result["checkpoint"])
    assert resolved.name == "vim_tiny" and resolved.img_size == 32
    assert resolved.model.pos_embed.shape[1] == (32 // 16) ** 2 + 1
    with torch.no_grad():
        assert resolved.model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
