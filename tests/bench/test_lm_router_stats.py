"""ESH LM's router statistics in the LM-quality benchmark: character classes, α by class and
position, and the validation loss with the attention path forced off and on."""

from __future__ import annotations

import math

import pytest
import torch

import esh
import esh.model
from esh.bench import lm_quality as bench
from esh.errors import InputError
from esh.layers.router import TokenRouter

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny():
    return esh.ESHModel(esh.model.esh_tiny(vocab_size=8, max_seq_len=32)).eval()


@pytest.mark.parametrize(
    "ch, cls",
    [
        ("a", "letter"),
        ("Z", "letter"),
        (" ", "whitespace"),
        ("\t", "whitespace"),
        ("\n", "newline"),
        (",", "punctuation"),
        ("'", "punctuation"),
        ("7", "other"),
        ("$", "other"),
    ],
)
def test_character_classes(ch, cls):
    assert bench.char_class(ch) == cls


def test_forcing_alpha_sets_every_router_and_is_undone():
    model = _tiny()
    ids = torch.randint(0, 8, (2, 9))
    with bench.forced_alpha(model, 1.0):
        forced = model(ids, labels=ids).alphas
    assert all(torch.equal(a, torch.ones_like(a)) for a in forced)
    free = model(ids, labels=ids).alphas
    assert not all(torch.equal(a, torch.ones_like(a)) for a in free)  # the hooks are gone
    with pytest.raises(InputError, match="has no token router"), bench.forced_alpha(torch.nn.Linear(2, 2), 0.0):
        pass


def test_router_statistics_count_every_token_and_score_each_path():
    model = _tiny()
    with torch.no_grad():  # a router that reads one feature: α differs from token to token
        for block in model.modules():
            if isinstance(block, TokenRouter):
                block.proj.weight.normal_(0, 1.0)
    classes = ["letter", "letter", "whitespace", "newline", "punctuation", "other", "letter", "letter"]
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 8, (3, 9), generator=g) for _ in range(2)]
    st = bench.router_statistics(model, windows, classes)
    tokens = sum(v["tokens"] for v in st["alpha_by_class"].values())
    assert tokens == 2 * 3 * 9
    expected_letters = sum(int(sum(classes[i] == "letter" for i in w.flatten().tolist())) for w in windows)
    assert st["alpha_by_class"]["letter"]["tokens"] == expected_letters
    assert all(0 < a < 1 for a in st["alpha_by_position"]) and len(st["alpha_by_position"]) == 4
    # the free loss is the model's own mean next-token loss over the windows
    with torch.no_grad():
        mean = sum(float(model(w, labels=w).ce_loss) for w in windows) / 2
    assert st["val_nats"] == pytest.approx(mean, rel=1e-5)
    assert st["val_nats_ssm_only"] != pytest.approx(st["val_nats"]) != st["val_nats_attention_only"]
    table = bench.format_router_table([{"seed": 1, "router": st}, {"seed": 2}])
    assert table.count("\n") == 2 and f"{st['val_nats_ssm_only']:.4f}" in table


def test_a_forced_router_gives_its_constant_for_every_class():
    model = _tiny()
    windows = [torch.arange(8).repeat(2, 1)[:, :8]]
    classes = ["letter"] * 4 + ["newline"] * 4
    with bench.forced_alpha(model, 0.25):
        st = bench.router_statistics(model, windows, classes)
    assert st["alpha_by_class"]["letter"]["alpha"] == pytest.approx(0.25)
    assert st["alpha_by_class"]["newline"]["alpha"] == pytest.approx(0.25)
    assert math.isnan(st["alpha_by_class"]["punctuation"]["alpha"])


def _row(model, seed, nats, seconds, alpha=None):
    row = {
        "model": model,
        "seed": seed,
        "total": 812_000,
        "non_embedding": 793_000,
        "active": 812_000,
        "val_nats_per_char": nats,
        "val_bits_per_char": nats / math.log(2),
        "val_ppl": math.exp(nats),
        "train_seconds": seconds,
    }
    if alpha is not None:
        row["router"] = {
            "alpha_by_class": {c: {"alpha": alpha, "tokens": 10} for c in bench.CHAR_CLASSES},
            "alpha_by_position": [alpha] * bench.POSITION_BUCKETS,
            "val_nats": nats,
            "val_nats_ssm_only": nats + 0.2,
            "val_nats_attention_only": nats + 2.0,
        }
    return row


def test_summary_over_seeds_gives_mean_spread_and_the_time_relative_to_the_gpt_of_each_seed():
    rows = [
        _row("esh", 1, 1.60, 150.0, alpha=0.2),
        _row("gpt", 1, 1.88, 100.0),
        _row("esh", 2, 1.62, 180.0, alpha=0.4),
        _row("gpt", 2, 1.90, 120.0),
        _row("mamba", 3, 1.59, 300.0),  # no GPT with this seed: no ratio
    ]
    summary = bench.summarize(rows)
    assert summary["esh"]["seeds"] == [1, 2] and summary["esh"]["vs_gpt"] == [1.5, 1.5]
    assert summary["mamba"]["vs_gpt"] == []
    table = bench.format_summary(rows)
    esh_line = next(line for line in table.splitlines() if line.startswith("| esh "))
    assert "1.610 ± 0.014" in esh_line and "165 ± 21 s" in esh_line and "1.50 ± 0.00x" in esh_line
    mamba_line = next(line for line in table.splitlines() if line.startswith("| mamba "))
    assert "| 1.590 |" in mamba_line and mamba_line.endswith("| - |")
    router = bench.format_router_summary(rows)
    assert "0.300 ± 0.141" in router and "0.300 / 0.300 / 0.300 / 0.300" in router
    assert "1.810 ± 0.014" in router  # attention off
    assert bench.format_router_summary([_row("gpt", 1, 1.9, 1.0)]) == ""
