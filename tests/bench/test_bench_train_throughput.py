"""esh bench train: every (model, mode) timed once per round, in turn, median per model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esh.bench import train_throughput as tt
from esh.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")


class _Tiny(nn.Module):
    def __init__(self, name, calls):
        super().__init__()
        self.name, self.calls, self.num_classes = name, calls, 10
        self.pretrained_cfg = {"input_size": (3, 16, 16)}
        self.head = nn.Linear(3, 10)

    def forward(self, x):
        self.calls.append((self.name, torch.is_autocast_enabled("cpu")))
        return self.head(x.mean((2, 3)))


def test_rounds_interleave_every_model_and_mode(monkeypatch):
    calls = []
    monkeypatch.setattr(tt, "build", lambda name: _Tiny(name, calls))
    lines = []
    rows = tt.run(pairs=(("a", "peer_a"), ("b", "peer_b")), batch=2, threads=None, repeats=3, print_fn=lines.append)
    keys = [(n, amp) for n in ("a", "peer_a", "b", "peer_b") for amp in (False, True)]
    assert calls[: len(keys)] == keys  # one warm-up step each, as they are built
    assert calls[len(keys) :] == keys * 3  # then three rounds, every (model, mode) in turn
    assert [r[:3] for r in rows] == [("a", "a", 16), ("a", "peer_a", 16), ("b", "b", 16), ("b", "peer_b", 16)]
    assert all(r[4] > 0 and r[5] > 0 for r in rows)
    assert "median of 3 interleaved rounds" in lines[0]


def test_float32_only_and_pair_selection(monkeypatch):
    calls = []
    monkeypatch.setattr(tt, "build", lambda name: _Tiny(name, calls))
    rows = tt.run(pairs=tt.select_pairs(["vim_tiny"]), batch=1, threads=None, repeats=1, bf16=False, print_fn=str)
    assert [r[1] for r in rows] == ["vim_tiny", "deit_tiny_patch16_224"] and rows[0][5] is None
    assert {amp for _, amp in calls} == {False}
    assert ("esh_vision_tiny", "deit_small_patch16_224") in tt.PAIRS
    with pytest.raises(InputError, match="unknown pair 'resnet'"):
        tt.select_pairs(["resnet"])


def test_lm_table_times_each_models_own_trainer_and_compares_to_the_gpt():
    from types import SimpleNamespace

    data = SimpleNamespace(tokenizer=SimpleNamespace(vocab_size=24), train=torch.randint(0, 24, (4000,)))
    lines = []
    rows = tt.run_lm(("esh", "gpt", "mamba"), steps=1, threads=None, repeats=2, data=data, print_fn=lines.append)
    assert [r[0] for r in rows] == ["esh", "gpt", "mamba"]
    assert all(r[1] > 0 and r[2] > 0 for r in rows)
    assert rows[1][3] == 1.0 and rows[0][3] > 0 and rows[2][3] > 0
    text = lines[0]
    assert "median of 2 interleaved rounds of 1 steps" in text and "| gpt |" in text and "1.00x" in text
    no_gpt = tt.run_lm(("mamba",), steps=1, threads=None, repeats=1, data=data, print_fn=str)
    assert no_gpt[0][3] is None


def test_lm_steps_and_rounds_must_be_positive():
    import argparse

    parser = argparse.ArgumentParser()
    tt.add_arguments(parser)
    with pytest.raises(InputError, match="--lm-steps must be a positive"):
        tt.main_from_args(parser.parse_args(["--lm", "--lm-steps", "0"]))
    for argv in (["--lm", "--repeats", "0"], ["--repeats", "-1"]):
        with pytest.raises(InputError, match="--repeats must be a positive"):
            tt.main_from_args(parser.parse_args(argv))
