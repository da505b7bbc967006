"""The LM-quality benchmark's interleaved training: the same weights and losses as training the
models one after the other (each model keeps its own random streams), and bad settings refused."""

from __future__ import annotations

import pytest

from esh.bench import lm_quality as bench
from esh.data.text import prepare_lm_data
from esh.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return prepare_lm_data("shakespeare", tokenizer="char")


def _with_dropout(monkeypatch):
    # dropout draws from the global generator at every step: two models interleaved would swap
    # draws unless each model's streams are restored around its turns
    from esh.models.gpt import GPT, GPTConfig

    def build(name, vocab_size, block_size):
        cfg = GPTConfig(vocab_size=vocab_size, block_size=block_size + 1, n_layer=1, n_head=2, n_embd=16, dropout=0.3)
        if name == "mamba":
            cfg.n_embd = 32
        return GPT(cfg)

    monkeypatch.setattr(bench, "build_model", build)


def test_interleaved_training_gives_the_sequential_results_bit_for_bit(data, monkeypatch):
    _with_dropout(monkeypatch)
    steps, names = 7, ("gpt", "mamba")  # two small dropout GPTs standing in for the models
    one_by_one = [bench.train_one(name, data, steps, seed=3, eval_windows=4) for name in names]
    interleaved = bench.train_interleaved(names, data, steps, seed=3, round_steps=3, eval_windows=4)
    assert [r["model"] for r in interleaved] == list(names)
    for a, b in zip(one_by_one, interleaved):
        assert a["val_nats_per_char"] == b["val_nats_per_char"], a["model"]
        assert a["steps"] == b["steps"] == steps and b["train_seconds"] > 0
    # and the dropout made the streams matter: the other seed's losses differ
    other = bench.train_one("gpt", data, steps, seed=4, eval_windows=4)
    assert other["val_nats_per_char"] != one_by_one[0]["val_nats_per_char"]


def test_interleaved_benchmark_models_match_sequential_ones(data):
    steps, names = 4, bench.MODELS
    one_by_one = [bench.train_one(name, data, steps, seed=1, eval_windows=2) for name in names]
    interleaved = bench.train_interleaved(names, data, steps, seed=1, round_steps=3, eval_windows=2)
    assert [a["val_nats_per_char"] for a in one_by_one] == [b["val_nats_per_char"] for b in interleaved]
    assert "router" in interleaved[0] and interleaved[0]["model"] == "esh"


def test_bad_interleave_settings_are_refused(data, tmp_path, capsys):
    with pytest.raises(InputError, match="round_steps"):
        bench.train_interleaved(("gpt",), data, 2, seed=0, round_steps=0)
    with pytest.raises(InputError, match="interleave"):
        bench.run(("gpt",), max_steps=2, interleave=2, run_dir=str(tmp_path))
    for argv in (
        ["--interleave", "0"],
        ["--interleave", "5", "--run-dir", str(tmp_path)],
        ["--interleave", "5", "--progress"],
    ):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2
        assert "--interleave takes" in capsys.readouterr().err


def test_the_cli_prints_the_tables_of_an_interleaved_run(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    bench.main(
        [
            "--models",
            "gpt",
            "mamba",
            "--max-steps",
            "2",
            "--eval-windows",
            "2",
            "--interleave",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    rows = [line for line in out.read_text().splitlines() if line]
    assert len(rows) == 2
    printed = capsys.readouterr().out
    assert "train time / GPT's" in printed and "| mamba |" in printed
