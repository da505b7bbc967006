"""The training core both trainers share: settings and their aliases, weight-decay groups, the
auxiliary-loss protocol, the optimisation step, the output-directory lock, checks of every
setting before training, and what a resumed or diverging run leaves behind."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from digits_npz import small_npz as _small_npz
from torch import nn

import esh
import esh.model
from esh.cli import main
from esh.errors import InputError
from esh.train import LMTrainConfig, LMTrainer, VisionTrainConfig, VisionTrainer, train
from esh.train.checkpoint import load_training_checkpoint
from esh.train.lock import LOCK_FILE, OutputLock
from esh.train.logs import DivergedError
from esh.train.step import OptimizerStep, auxiliary_loss, param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def _vision_cfg(tmp_path, **kw) -> VisionTrainConfig:
    data = tmp_path / "small.npz"
    if not data.exists():
        _small_npz(data)
    base = dict(data=str(data), batch_size=8, epochs=2, out=str(tmp_path / "run"), progress=False, warmup_epochs=0.5)
    return VisionTrainConfig(**{**base, **kw})


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- names and settings ---------------------------------------------------------------------


def test_the_seeds_names_are_aliases_of_the_distinct_trainers():
    import esh.model
    import esh.training

    assert esh.Trainer is esh.training.Trainer is esh.train.LMTrainer
    assert esh.TrainingConfig is esh.training.TrainingConfig is esh.train.LMTrainConfig
    assert esh.model.esh_medium is esh.esh_medium and esh.model.ESHModel is esh.ESHModel
    assert esh.train.VisionTrainer is not esh.train.LMTrainer
    assert not hasattr(esh.train, "Trainer")  # no name that means one trainer here and the other there


def test_the_lm_configs_older_names_are_accepted_everywhere():
    cfg = esh.TrainingConfig(use_amp=True, gradient_accumulation_steps=2, grad_clip=0.5, out_dir=None, num_epochs=3)
    assert (cfg.amp, cfg.grad_accum, cfg.clip_grad, cfg.out, cfg.epochs) == (True, 2, 0.5, None, 3)
    assert cfg.use_amp is True and cfg.gradient_accumulation_steps == 2
    cfg.use_checkpoint = True
    assert cfg.grad_checkpointing is True
    saved = {"use_amp": True, "out_dir": "runs/x", "use_checkpoint": False, "num_epochs": 1}  # a saved LM run
    assert LMTrainConfig.from_dict(saved).out == "runs/x"
    with pytest.raises(InputError, match="given twice"):
        LMTrainConfig(amp=True, use_amp=False)


@pytest.mark.parametrize(
    "make, close",
    [
        (lambda: VisionTrainConfig.from_dict({"epoch": 3}), "'epochs'"),
        (lambda: LMTrainConfig.from_dict({"grad_acum": 2}), "'grad_accum'"),
        (lambda: LMTrainConfig(warmup_step=3), "'warmup_steps'"),
        (lambda: train(lable_smoothing=0.2), "'label_smoothing'"),
    ],
)
def test_an_unknown_setting_is_an_error_naming_the_close_matches(make, close):
    with pytest.raises(InputError, match=f"unknown .*setting .*did you mean {close}"):
        make()


def test_help_derives_every_option_from_the_config_and_shows_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--epochs EPOCHS epochs (default: 8)" in text
    assert "--label-smoothing LABEL_SMOOTHING label smoothing of the cross-entropy (default: 0.1)" in text
    assert "--checkpoint CHECKPOINT initial weights (default: none)" in text
    with pytest.raises(SystemExit):
        main(["lm", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 300)" in text and "--grad-accum GRAD_ACCUM, --gradient-accumulation-steps" in text


# --- weight decay ---------------------------------------------------------------------------


def _names(groups):
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    return set(decay["param_names"]), set(no_decay["param_names"])


def test_mamba_state_parameters_biases_and_norms_get_no_weight_decay():
    from esh.layers.mamba import Mamba

    decay, no_decay = _names(param_groups(nn.Sequential(nn.LayerNorm(16), Mamba(16)), 0.1, names=True))
    assert {"1.A_log", "1.D", "1.dt_proj.bias", "1.conv1d.bias", "0.weight", "0.bias"} <= no_decay
    assert {"1.in_proj.weight", "1.x_proj.weight", "1.dt_proj.weight", "1.out_proj.weight"} <= decay
    assert not decay & no_decay


def test_both_trainers_keep_mamba_state_out_of_weight_decay(tmp_path):
    model = esh.create_model("mambavision_nano", num_classes=4)
    decay, no_decay = _names(param_groups(model, 0.1, names=True))
    a_logs = {n for n in decay | no_decay if n.endswith(".A_log")}
    assert a_logs and a_logs <= no_decay  # 2-D, and decayed before
    trainer = VisionTrainer(_vision_cfg(tmp_path, weight_decay=0.1))
    by_param = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, p in trainer.model.named_parameters():
        assert by_param[id(p)] == (0.0 if name in no_decay else 0.1), name

    lm = esh.ESHModel(esh.model.esh_tiny(vocab_size=64, max_seq_len=32))
    decay, no_decay = _names(param_groups(lm, 0.1, names=True))
    assert any(n.endswith("A_log") for n in no_decay) and not any(n.endswith("A_log") for n in decay)
    assert any(n.endswith(".D") for n in no_decay)


# --- one auxiliary-loss protocol and one optimisation step ------------------------------------


def test_one_auxiliary_loss_protocol_for_vision_hooks_and_lm_outputs():
    model = nn.Linear(2, 2)
    model.auxiliary_losses = lambda step: {"loss_a": torch.tensor(0.5), "loss_b": torch.tensor(0.25), "x": 3}
    total, logged = auxiliary_loss(model, torch.zeros(1), step=4)
    assert float(total) == 0.75 and logged == {"loss_a": 0.5, "loss_b": 0.25, "x": 3.0}

    class Out:
        aux_loss = torch.tensor(0.125)

    total, logged = auxiliary_loss(nn.Linear(2, 2), Out(), step=0)
    assert total is None and float(logged["aux_loss"]) == 0.125  # already part of the LM's loss


def test_accumulation_skips_the_gradient_all_reduce_until_the_last_micro_batch():
    entered = []

    class FakeDDP(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def no_sync(self):
            import contextlib

            entered.append("no_sync")
            return contextlib.nullcontext()

    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = OptimizerStep(model, FakeDDP(model), opt, torch.amp.GradScaler("cpu", enabled=False), 3, 1e-3)
    before = model.weight.detach().clone()
    for i in range(3):
        with step.micro_batch(last=i == 2):
            step.backward(model(torch.ones(1, 3)).sum())
    norm = step.update()
    assert entered == ["no_sync", "no_sync"]
    assert float(norm) == pytest.approx(float(torch.tensor([1.0, 1, 1, 1]).norm()))  # mean of 3 equal grads
    assert model.weight.grad is None and not torch.equal(model.weight, before)


# --- the output-directory lock ----------------------------------------------------------------


def test_a_second_run_into_a_locked_directory_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text(f"{os.getppid()}\n")  # a live process holds it
    data = _small_npz(tmp_path / "small.npz")
    args = ["--data", str(data), "--batch-size", "8", "--out", str(tmp_path / "run"), "--max-steps", "1"]
    code = main(["train", *args])
    err = capsys.readouterr().err
    assert code == 2 and "in use by another run" in err and str(os.getppid()) in err
    assert not (tmp_path / "run" / "best.pth").exists()


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    (tmp_path / LOCK_FILE).write_text(f"{_dead_pid()}\n")
    with OutputLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        with OutputLock(tmp_path):  # the same process again: nested, not refused
            pass
        assert (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()


# --- every setting checked before training ---------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "epochs must be an integer >= 1"),
        (["--epochs", "-1"], "epochs must be an integer >= 1"),
        (["--grad-accum", "0"], "grad_accum must be an integer >= 1"),
        (["--label-smoothing", "2"], "label_smoothing must be a finite number >= 0 and <= 1"),
        (["--img-size", "0"], "img_size must be an integer >= 8"),
        (["--img-size", "100000"], "img_size must be at most 4096"),
        (["--lr", "inf"], "lr must be a finite number > 0"),
        (["--device", "banana"], "unknown device 'banana'"),
        (["--randaug", "garbage"], "randaug 'garbage' is not a timm augmentation policy"),
        (["--model-arg", "foo=1"], "foo"),
    ],
)
def test_bad_training_settings_are_one_line_errors(tmp_path, capsys, args, message):
    data = _small_npz(tmp_path / "small.npz")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--batch-size", "8", "--out", str(out), "--max-steps", "1", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "last.pth").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    assert main(["train", "--device", "cuda", "--out", str(tmp_path), "--max-steps", "1"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--eval-iters", "0"], "eval_iters must be an integer >= 1"),
        (["--prompt", ""], "prompt of the sample is empty"),
        (["--sample-tokens", "-5"], "sample_tokens must be an integer >= 0"),
        (["--eval-interval", "-1"], "eval_interval must be an integer >= 0"),
        (["--warmup-steps", "-1"], "warmup_steps must be an integer >= 0"),
        (["--lr", "inf"], "lr must be a finite number > 0"),
        (["--grad-accum", "0"], "grad_accum must be an integer >= 1"),
        (["--device", "banana"], "unknown device 'banana'"),
    ],
)
def test_bad_lm_settings_are_refused_before_training(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["lm", "train", "--out", str(out), "--max-steps", "2", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not (out / "last.pth").exists()


def test_resume_with_another_batch_size_is_refused(tmp_path):
    train(_vision_cfg(tmp_path, epochs=1, max_steps=1))
    with pytest.raises(InputError, match="its batch_size is 8, not 16"):
        train(resume=str(tmp_path / "run"), batch_size=16)


# --- what a run leaves behind -----------------------------------------------------------------


def _metrics(path, drop):
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != drop} for row in csv.DictReader(f)]


def test_a_run_resumed_mid_epoch_writes_the_same_metrics(tmp_path):
    whole = _vision_cfg(tmp_path, out=str(tmp_path / "whole"))
    train(whole)
    cut = _vision_cfg(tmp_path, out=str(tmp_path / "cut"), max_steps=3)  # mid-way through the first epoch
    train(cut)
    train(resume=str(tmp_path / "cut"), max_steps=None)
    a = _metrics(tmp_path / "whole" / "metrics.csv", "images_per_s")
    b = _metrics(tmp_path / "cut" / "metrics.csv", "images_per_s")
    assert len(a) == 2 and a == b
    history = load_training_checkpoint(tmp_path / "cut" / "last.pth")["history"]
    assert [r["epoch"] for r in history] == [1, 2]  # the cut epoch's row was replaced, not kept


def test_stale_temporary_files_are_removed_at_the_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / f".last.pth.tmp{_dead_pid()}"
    stale.write_bytes(b"x" * 100)
    train(_vision_cfg(tmp_path, epochs=1, max_steps=1))
    assert not stale.exists() and (out / "last.pth").is_file()


def test_a_diverging_vision_run_stops_before_claiming_a_checkpoint(tmp_path):
    trainer = VisionTrainer(_vision_cfg(tmp_path, epochs=1, log_interval=1, save_every=1))
    trainer.model.auxiliary_losses = lambda step: {"loss_x": torch.tensor(float("nan") if step >= 2 else 0.0)}
    with pytest.raises(DivergedError, match="the loss is nan at step 3"):
        trainer.fit()
    out = tmp_path / "run"
    assert not (out / "best.pth").exists()
    assert load_training_checkpoint(out / "last.pth")["global_step"] == 2
    assert not (out / LOCK_FILE).exists()


def test_a_diverging_lm_run_stops_at_the_first_non_finite_loss(tmp_path):
    from esh.data.text import RandomBlockDataset
    from esh.models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    calls = []

    def poison(module, args, out):
        calls.append(1)
        if len(calls) >= 3:
            out.loss = out.loss * float("inf")
        return out

    model.register_forward_hook(poison)
    tokens = torch.randint(0, 64, (400,))
    loader = torch.utils.data.DataLoader(RandomBlockDataset(tokens, 8, num_samples=64, seed=0), batch_size=4)
    cfg = LMTrainConfig(max_steps=6, save_every=1, log_interval=4, out=str(tmp_path), progress=False, device="cpu")
    with pytest.raises(DivergedError, match="at step 3"):
        LMTrainer(model, loader, cfg).train()
    assert load_training_checkpoint(tmp_path / "last.pth")["global_step"] == 2


def test_lm_train_saves_the_model_before_the_sample(tmp_path, monkeypatch):
    import esh.train.lm_job as job

    def fail(*a, **k):
        raise RuntimeError("sampling broke")

    monkeypatch.setattr(job, "generate_with", fail)
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 60)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="sampling broke"):
        job.train_lm(data=str(text), tokenizer="char", out=str(out), progress=False, **job.SMOKE_TEST)
    assert load_training_checkpoint(out / "last.pth")["global_step"] == 4
    assert (out / "model.safetensors").is_file() and not (out / LOCK_FILE).exists()


def test_an_lm_run_resumed_mid_way_writes_the_same_metrics(tmp_path):
    from esh.data.text import ContiguousBlockDataset, RandomBlockDataset
    from esh.models.gpt import GPT, GPTConfig

    tokens = torch.randint(0, 64, (600,), generator=torch.Generator().manual_seed(0))

    def run(out, until=None, resume=False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
        train_loader = torch.utils.data.DataLoader(
            RandomBlockDataset(tokens[:500], 8, num_samples=32, seed=1),
            batch_size=4,
            shuffle=True,
            generator=torch.Generator().manual_seed(2),
        )
        val = torch.utils.data.DataLoader(ContiguousBlockDataset(tokens[500:], 8), batch_size=4)
        cfg = LMTrainConfig(max_steps=12, eval_interval=4, eval_iters=2, out=str(out), progress=False, device="cpu")
        trainer = LMTrainer(model, train_loader, cfg, val)
        if resume:
            trainer.load_checkpoint(out)
        trainer.train(until=until)

    run(tmp_path / "whole")
    run(tmp_path / "cut", until=6)
    run(tmp_path / "cut", resume=True)
    a = _metrics(tmp_path / "whole" / "metrics.csv", "elapsed_s")
    b = _metrics(tmp_path / "cut" / "metrics.csv", "elapsed_s")
    assert [r["step"] for r in a] == ["4", "8", "12"] and [r["step"] for r in b] == ["4", "6", "8", "12"]
    assert a == [r for r in b if r["step"] != "6"]  # the cut run also evaluated where it stopped


@pytest.mark.parametrize("device", ["banana", "cuda:7"])
def test_lm_generate_reads_the_device_once(tmp_path, capsys, device):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert main(["lm", "generate", "--checkpoint", str(tmp_path), "--prompt", "x", "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"{device!r}" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "edit", [{"rng": {}}, {"optimizer": {}}, {"config": None}, {"model": [1, 2]}, {"epoch": "x"}, {"scheduler": 3}]
)
def test_a_hand_edited_vision_checkpoint_is_a_clear_error(tmp_path, edit):
    from esh.models._checkpoint import CheckpointError

    train(_vision_cfg(tmp_path, epochs=1, max_steps=1))
    last = tmp_path / "run" / "last.pth"
    ckpt = torch.load(last, weights_only=True)
    torch.save({**ckpt, **edit}, last)
    with pytest.raises(CheckpointError):
        train(resume=str(tmp_path / "run"))


@pytest.mark.parametrize("edit", [{"epoch_rng": {}}, {"history": 5}, {"global_step": None}, {"rng": {"torch": 1}}])
def test_a_hand_edited_lm_checkpoint_is_a_clear_error(tmp_path, edit):
    from esh.data.text import RandomBlockDataset
    from esh.models._checkpoint import CheckpointError
    from esh.models.gpt import GPT, GPTConfig

    def trainer():
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
        tokens = torch.randint(0, 64, (400,), generator=torch.Generator().manual_seed(0))
        loader = torch.utils.data.DataLoader(RandomBlockDataset(tokens, 8, num_samples=16, seed=0), batch_size=4)
        return LMTrainer(model, loader, LMTrainConfig(max_steps=2, out=str(tmp_path), progress=False, device="cpu"))

    trainer().train()
    last = tmp_path / "last.pth"
    torch.save({**torch.load(last, weights_only=True), **edit}, last)
    with pytest.raises(CheckpointError):
        trainer().load_checkpoint(tmp_path)


def test_adam_and_adamw_use_the_fused_kernel_on_cpu_and_cuda_only():
    from esh.train.step import fused_options

    cpu, cuda, mps = (torch.device(d) for d in ("cpu", "cuda", "mps"))
    assert fused_options("adamw", cpu) == {"fused": True} == fused_options("AdamW", cuda) == fused_options("adam", cpu)
    assert fused_options("adamw", mps) == {} and fused_options("sgd", cpu) == {} and fused_options("lamb", cpu) == {}


def test_both_trainers_build_fused_adamw_on_the_cpu(tmp_path):
    vision = VisionTrainer(_vision_cfg(tmp_path))
    assert isinstance(vision.optimizer, torch.optim.AdamW) and vision.optimizer.defaults["fused"] is True
    sgd = VisionTrainer(_vision_cfg(tmp_path, optimizer="sgd", out=str(tmp_path / "sgd")))
    assert not sgd.optimizer.defaults.get("fused")
    model = esh.ESHModel(esh.model.esh_tiny(vocab_size=16, max_seq_len=16))
    ids = torch.randint(0, 16, (8, 9))
    lm = LMTrainer(model, torch.utils.data.DataLoader(ids, batch_size=4), LMTrainConfig(max_steps=1, progress=False))
    assert lm.optimizer.defaults["fused"] is True
