"""The LM trainer, exact resume, checkpoints, the GPT baseline and `esh lm train/generate`."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch.utils.data import DataLoader

from esh.cli import main
from esh.data.text import ContiguousBlockDataset, RandomBlockDataset
from esh.data.tokenizer import ByteTokenizer
from esh.models.esh_lm import ESHConfig, ESHModel
from esh.models.gpt import GPT, GPTConfig
from esh.train.checkpoint import load_training_checkpoint
from esh.train.lm import LMTrainConfig, LMTrainer, cosine_lr
from esh.train.step import param_groups

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_esh(**kw) -> ESHModel:
    torch.manual_seed(0)
    cfg = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=2, n_experts=2, expert_hidden=32, max_seq_len=64)
    return ESHModel(ESHConfig(**{**cfg, **kw}))


def loaders(block: int = 16, batch: int = 4, samples: int = 64):
    tokens = ByteTokenizer().encode_tensor(TEXT)
    cut = int(len(tokens) * 0.9)
    train = DataLoader(
        RandomBlockDataset(tokens[:cut], block, num_samples=samples, seed=1),
        batch_size=batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(2),
    )
    return train, DataLoader(ContiguousBlockDataset(tokens[cut:], block), batch_size=8)


def config(tmp_path, **kw) -> LMTrainConfig:
    base = dict(lr=3e-3, warmup_steps=3, max_steps=30, eval_interval=10, eval_iters=4, out_dir=str(tmp_path))
    return LMTrainConfig(**{**base, "progress": False, "device": "cpu", "eval_bytes_per_token": 1.0, **kw})


def test_cosine_schedule_warms_up_then_decays_to_min_lr():
    lrs = [cosine_lr(s, 1e-3, 1e-4, 10, 100) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == lrs[119] == pytest.approx(1e-4)


def test_weight_decay_only_on_matrices():
    model = tiny_esh()
    decay, no_decay = param_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    for name, p in model.named_parameters():
        expect = p.dim() >= 2 and not getattr(p, "_no_weight_decay", False)
        assert (id(p) in decayed) == expect, name
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_training_lowers_the_loss_and_logs_routing(tmp_path):
    model = tiny_esh()
    train, val = loaders()
    trainer = LMTrainer(model, train, config(tmp_path, max_steps=40), val)
    before = trainer.evaluate()["val_loss"]
    result = trainer.train()
    assert result["val_loss"] < before - 0.5
    assert result["val_bpb"] == pytest.approx(result["val_loss"] / math.log(2))
    header = (tmp_path / "steps.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "ce_loss", "aux_loss", "alpha_mean", "load_balance_loss", "lr", "grad_norm"} <= set(header)
    assert len((tmp_path / "steps.csv").read_text().splitlines()) == 41
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 5  # header + steps 10, 20, 30, 40


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_equals_one_uninterrupted_run(tmp_path, accum):
    def run(out, stop=None, resume=False):
        model = tiny_esh(router_jitter=0.01, dropout=0.1)  # random numbers in every step
        train, val = loaders(samples=24)  # several data epochs in 20 steps
        trainer = LMTrainer(model, train, config(out, max_steps=20, gradient_accumulation_steps=accum), val)
        if resume:
            torch.manual_seed(123)  # whatever the global state, the checkpoint restores it
            trainer.load_checkpoint(out)
        trainer.train(until=stop)
        return model

    whole = run(tmp_path / "a")
    run(tmp_path / "b", stop=7)
    resumed = run(tmp_path / "b", resume=True)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoints_are_complete_and_atomic(tmp_path):
    model = tiny_esh()
    train, val = loaders()
    LMTrainer(model, train, config(tmp_path, max_steps=5, eval_interval=0), val).train()
    ckpt = load_training_checkpoint(tmp_path / "last.pth")
    assert ckpt["global_step"] == 5 and {"optimizer", "rng", "epoch_rng", "scaler"} <= set(ckpt)
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    again = ESHModel.from_pretrained(tmp_path)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_bad_batches_and_settings_are_refused(tmp_path):
    model = tiny_esh()
    bad = DataLoader([(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))], batch_size=1)
    with pytest.raises(ValueError, match="batches of token ids"):
        LMTrainer(model, bad, config(tmp_path, max_steps=1)).train()
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        LMTrainConfig(gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="amp_dtype"):
        LMTrainConfig(amp_dtype="float8")
    with pytest.raises(ValueError, match="no length"):
        LMTrainer(model, iter([]), config(tmp_path, max_steps=None))


def test_bf16_autocast_and_gradient_checkpointing_train(tmp_path):
    model = tiny_esh()
    train, val = loaders()
    result = LMTrainer(model, train, config(tmp_path, max_steps=3, use_amp=True, use_checkpoint=True), val).train()
    assert model.grad_checkpointing and math.isfinite(result["val_loss"])


def test_gpt_baseline_trains_and_its_cache_gives_the_same_tokens(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=48, n_layer=2, n_head=2, n_embd=32))
    train, val = loaders()
    result = LMTrainer(model, train, config(tmp_path, max_steps=15, out_dir=None), val).train()
    assert result["val_loss"] < math.log(256)
    prompt = torch.randint(0, 256, (2, 5))
    assert torch.equal(model.generate(prompt, 20), model.generate(prompt, 20, use_cache=False))


def test_cli_trains_and_generates(tmp_path, capsys):
    data = tmp_path / "hamlet.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    assert main(["lm", "train", "--smoke-test", "--data", str(data), "--out", str(out), "--tokenizer", "char"]) == 0
    printed = capsys.readouterr().out
    assert "validation loss" in printed and "bits/char" in printed
    assert {"config.json", "model.safetensors", "esh_tokenizer.json", "last.pth", "lm_job.json"} <= {
        p.name for p in out.iterdir()
    }
    assert main(["lm", "generate", "--checkpoint", str(out), "--prompt", "To be", "--max-new-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("To be") and len(text.rstrip("\n")) == len("To be") + 8
    # continue the run for two more steps
    assert main(["lm", "train", "--resume", str(out), "--max-steps", "6", "--sample-tokens", "0"]) == 0
    assert load_training_checkpoint(out / "last.pth")["global_step"] == 6


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["lm", "train", "--data", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    small = tmp_path / "small.txt"
    small.write_text("tiny text")
    assert main(["lm", "train", "--data", str(small), "--smoke-test", "--out", str(tmp_path / "o")]) == 2
    assert "block_size" in capsys.readouterr().err
    assert main(["lm", "generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "esh_tokenizer.json" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_train_the_moe_model(tmp_path, mode):
    # two CPU processes over gloo: experts that one rank's tokens never chose must not stall
    # DDP's reduction (FSDP2 shards the blocks), and rank 0 writes the checkpoint
    import os
    import subprocess
    import sys

    data = tmp_path / "hamlet.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    script = tmp_path / "job.py"
    script.write_text(
        "from esh.train.lm_job import train_lm\n"
        f"train_lm(config='tiny', data={str(data)!r}, tokenizer='char', sample_tokens=0, max_steps=3,"
        f" batch_size=4, block_size=32, eval_iters=1, out_dir={str(out)!r}, distributed={mode!r})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_training_checkpoint(out / "last.pth")["global_step"] == 3


def _count_reads_by_the_trainers(monkeypatch) -> list[str]:
    """Every tensor -> Python conversion (each one waits for the device) made by esh.train's code."""
    import sys

    calls: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("esh.train"):
                calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("log_interval, reads", [(1, 8), (4, 2)])
def test_step_statistics_are_read_from_the_device_once_per_log_interval(tmp_path, monkeypatch, log_interval, reads):
    model = tiny_esh()
    losses = []
    model.register_forward_hook(lambda m, args, out: losses.append(out.loss.item()))
    train, _ = loaders()
    cfg = config(tmp_path, max_steps=8, gradient_accumulation_steps=2, log_interval=log_interval)
    trainer = LMTrainer(model, train, cfg)
    from esh.models.esh_lm import MoEStats

    monkeypatch.setattr(
        MoEStats, "_floats", lambda self: pytest.fail("the MoE statistics were read one step at a time")
    )
    calls = _count_reads_by_the_trainers(monkeypatch)
    trainer.train()
    monkeypatch.undo()
    assert calls == ["tolist"] * reads  # one read of all the pending steps' values at a time
    with open(tmp_path / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    # each row still holds its own step's loss: the mean over the step's two micro-batches
    expected = [(a / 2 + b / 2) for a, b in zip(losses[::2], losses[1::2])]
    assert [float(r["loss"]) for r in rows] == pytest.approx(expected, rel=1e-6)
    assert all(float(r["grad_norm"]) > 0 for r in rows)
