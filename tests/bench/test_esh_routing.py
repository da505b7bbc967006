"""The routing experiment's measurements: α against the digits' strokes on inputs whose answer is
known, the table and plot it writes, and one tiny end-to-end run."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import esh
from esh.bench import esh_routing as bench
from esh.cli import main
from esh.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")


def _digit_like(batch: int = 2, size: int = 16) -> torch.Tensor:
    """Dark images with one bright bar each, in different places."""
    gray = torch.zeros(batch, size, size)
    for b in range(batch):
        gray[b, 2 + 3 * b : 6 + 3 * b, 1 : size - 1] = 0.9
    return gray


def test_stroke_share_is_the_share_of_bright_pixels_under_each_token():
    gray = torch.zeros(1, 8, 8)
    gray[0, :4, :4] = 1.0  # the top-left token is all stroke
    gray[0, 4:, 4:6] = 0.8  # half of the bottom-right token
    gray[0, 0, 4] = 0.4  # below the threshold: background
    share = bench.stroke_share(gray, (2, 2), 4)
    assert share.tolist() == [[[1.0, 0.0], [0.0, 0.5]]]
    # a grid that overhangs the image: the padding is background
    assert bench.stroke_share(torch.ones(1, 6, 6), (2, 2), 4).tolist() == [[[1.0, 0.5], [0.5, 0.25]]]
    with pytest.raises(InputError, match="does not cover"):
        bench.stroke_share(torch.ones(1, 9, 9), (2, 2), 4)


def test_pearson_of_known_pairs():
    a = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert bench.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert bench.pearson(a, -a) == pytest.approx(-1.0)
    assert bench.pearson(a, torch.tensor([1.0, -1.0, -1.0, 1.0])) == pytest.approx(0.0)
    assert math.isnan(bench.pearson(a, torch.ones(4)))


def test_alpha_that_follows_the_strokes_correlates_one_and_its_opposite_minus_one():
    gray = _digit_like()
    share0 = bench.stroke_share(gray, (4, 4), 4)  # stage 0: 4-pixel tokens
    share1 = bench.stroke_share(gray, (2, 2), 8)  # stage 1: 8-pixel tokens
    follows = bench.alpha_stroke_correlation([share0 * 0.5 + 0.2, share1], [0, 1], gray, patch_size=4)
    assert follows["blocks"] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert follows["stage0"] == pytest.approx(1.0) and follows["mean"] == pytest.approx(1.0)
    opposite = bench.alpha_stroke_correlation([1 - share0], [0], gray, patch_size=4)
    assert opposite["mean"] == pytest.approx(-1.0)
    # α that ignores the image: near zero on many tokens
    g = torch.Generator().manual_seed(0)
    many = _digit_like(batch=4, size=64)
    noise = torch.rand(4, 16, 16, generator=g)
    assert abs(bench.alpha_stroke_correlation([noise], [0], many)["mean"]) < 0.15
    # a grid where every token holds the same share says nothing: NaN for that block, left out of the mean
    flat = bench.alpha_stroke_correlation([share0, torch.rand(2, 1, 1)], [0, 2], gray)
    assert math.isnan(flat["blocks"][1]) and flat["mean"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="2 α maps for 1 blocks"):
        bench.alpha_stroke_correlation([share0, share1], [0], gray)


def test_an_untrained_models_alpha_follows_the_strokes_through_the_entropy_prior():
    """The router starts as sigmoid(2 · entropy - 1): busy (stroke) patches lean to attention."""
    model = esh.create_model("esh_vision_nano", num_classes=3).eval()
    gray = _digit_like(batch=2, size=32)
    x = (gray[:, None].expand(-1, 3, -1, -1) - 0.5) / 0.25
    with torch.inference_mode():
        out = model.forward_with_aux(x)
    r = bench.alpha_stroke_correlation(out["alphas"], out["block_stage"], gray)
    assert len(r["blocks"]) == len(out["alphas"]) and r["stage0"] > 0.3
    model.set_routing(force_alpha=0.5)  # α no longer depends on the image: undefined everywhere
    with torch.inference_mode():
        out = model.forward_with_aux(x)
    assert math.isnan(bench.alpha_stroke_correlation(out["alphas"], out["block_stage"], gray)["mean"])


def _rows():
    rows = []
    for seed, acc in ((0, 90.0), (1, 92.0)):
        rows.append(
            dict(
                variant="esh_off",
                mode="soft",
                fraction=None,
                val_acc=acc,
                images_per_s=100.0,
                seed=seed,
                attn_fraction=0.3,
                ponder_cost=2.1,
                mid_share=0.5,
                stroke_r=0.4,
                stroke_r_untrained=0.8,
            )
        )
        rows.append(
            dict(
                variant="esh_off",
                mode="hard 0.5",
                fraction=0.5,
                val_acc=acc - 5,
                images_per_s=150.0,
                seed=seed,
                attn_fraction=0.5,
                ponder_cost=2.0,
            )
        )
        rows.append(dict(variant="convnext_atto", mode="-", fraction=None, val_acc=95.0, images_per_s=400.0, seed=seed))
    return rows


def test_the_table_reports_seed_means_and_spreads_and_the_plot_is_written(tmp_path):
    table = bench.format_table(_rows(), dict(img_size=56, epochs=2, batch_size=64, seeds=[0, 1], threads=1))
    assert (
        "| esh_off | soft | 91.0 ± 1.4 | 100 ± 0 | 30 ± 0 | 2.100 ± 0.000 | 0.50 ± 0.00 | 0.400 ± 0.000 (0.800 ± 0.000) |  |"
        in table
    )
    assert "| esh_off | hard 0.5 | 86.0 ± 1.4 | 150 ± 0 | 50 ± 0 | 2.000 ± 0.000 | - |  |  |" in table
    assert "| convnext_atto | - | 95.0 ± 0.0 | 400 ± 0 | - | - | - |  |  |" in table
    bench.plot(_rows(), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_a_tiny_run_writes_results_a_table_and_a_plot(tmp_path):
    printed = []
    rows = bench.run(
        tmp_path,
        seeds=[0],
        epochs=1,
        img_size=32,
        batch_size=16,
        limit=100,
        val_limit=16,
        fractions=(0.5, 0.0),
        variants=["esh_budget", "convnext_atto"],
        threads=None,
        repeats=1,
        print_fn=printed.append,
    )
    modes = [(r["variant"], r["mode"]) for r in rows]
    assert modes == [
        ("esh_budget", "soft"),
        ("esh_budget", "hard 0.5"),
        ("esh_budget", "hard 0"),
        ("convnext_atto", "-"),
    ]
    soft = rows[0]
    assert sum(soft["alpha_hist"]) > 0 and 0 <= soft["mid_share"] <= 1 and -1 <= soft["stroke_r_untrained"] <= 1
    assert rows[2]["attn_fraction"] == 0.0 and 0.0 < rows[1]["attn_fraction"] < 1.0  # tiny grids round the share
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["meta"]["limit"] == 100 and len(saved["rows"]) == 4
    with open(tmp_path / "results.csv") as f:
        assert [r["mode"] for r in csv.DictReader(f)] == ["soft", "hard 0.5", "hard 0", "-"]
    assert (tmp_path / "pareto.png").is_file() and "| esh_budget | soft |" in printed[-1]


def test_bad_options_are_refused_before_training(tmp_path, capsys):
    with pytest.raises(InputError, match="unknown variant 'esh_fast'"):
        bench.run(tmp_path, variants=["esh_fast"])
    assert main(["bench", "routing", "--budget", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "attention fractions in [0, 1]; got 2" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "results.json").exists()
