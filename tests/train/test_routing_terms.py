"""ESH-Vision's routing terms in training: the ponder schedule given in steps or as fractions of
the run, the routing-budget term (value, gradient, and its pull on the mean α in a short run),
and the options of ``esh train`` that set them."""

from __future__ import annotations

import csv

import pytest
import torch
from digits_npz import small_npz as _small_npz

import esh
from esh.cli import main
from esh.errors import InputError
from esh.models.esh_vision import budget_loss, ponder_weight_at
from esh.train import VisionTrainConfig, VisionTrainer, train
from esh.train.settings import check_steps_or_fraction, steps_of

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, **kw) -> VisionTrainConfig:
    data = tmp_path / "small.npz"
    if not data.exists():
        _small_npz(data)
    base = dict(
        model="esh_vision_nano",
        img_size=32,
        data=str(data),
        batch_size=8,
        epochs=2,
        out=str(tmp_path / "run"),
        progress=False,
        warmup_epochs=0.0,
    )
    return VisionTrainConfig(**{**base, **kw})


# --- schedules in steps or fractions ---------------------------------------------------------


@pytest.mark.parametrize(
    "value, total, steps", [(0, 500, 0), (0.3, 500, 150), (0.3, 16, 5), (0.999, 10, 10), (1, 500, 1), (200, 500, 200)]
)
def test_a_schedule_length_is_steps_from_one_and_a_fraction_below(value, total, steps):
    check_steps_or_fraction("x", value)
    assert steps_of(value, total) == steps


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), float("inf"), True, "3"])
def test_a_schedule_length_that_is_neither_is_refused(value):
    with pytest.raises(InputError, match="fraction of the run's optimizer steps"):
        check_steps_or_fraction("ponder_warmup", value)


def test_the_trainer_turns_fractions_into_steps_of_this_run(tmp_path):
    trainer = VisionTrainer(_cfg(tmp_path, ponder_warmup=0.25, ponder_ramp=0.5, ponder_weight=0.2))
    cfg = trainer.model.config
    assert trainer.total_steps == 2 * trainer.steps_per_epoch == 12  # 48 training images, batch 8, 2 epochs
    assert (cfg.ponder_warmup_steps, cfg.ponder_ramp_steps, cfg.ponder_weight) == (3, 6, 0.2)
    lam = [ponder_weight_at(s, cfg.ponder_weight, cfg.ponder_warmup_steps, cfg.ponder_ramp_steps) for s in range(12)]
    assert lam[:4] == [0.0] * 4 and lam[6] == pytest.approx(0.1) and lam[9:] == [pytest.approx(0.2)] * 3
    # max_steps shortens the run the fractions refer to; whole numbers stay steps
    trainer = VisionTrainer(_cfg(tmp_path, ponder_warmup=0.5, ponder_ramp=3, max_steps=10, alpha_var_weight=0.0))
    cfg = trainer.model.config
    assert (cfg.ponder_warmup_steps, cfg.ponder_ramp_steps, cfg.alpha_var_weight) == (5, 3, 0.0)


def test_unset_routing_terms_keep_the_models_defaults(tmp_path):
    cfg = VisionTrainer(_cfg(tmp_path)).model.config
    assert (cfg.ponder_warmup_steps, cfg.ponder_ramp_steps, cfg.routing_budget) == (15000, 5000, None)


def test_routing_terms_on_a_model_without_them_are_refused(tmp_path):
    with pytest.raises(InputError, match="--routing-budget: mambavision_nano has no routing terms"):
        VisionTrainer(_cfg(tmp_path, model="mambavision_nano", routing_budget=0.25))


# --- the routing-budget term ------------------------------------------------------------------


def test_the_budget_term_is_the_mean_squared_gap_of_each_blocks_mean_alpha():
    a = torch.tensor([[0.2, 0.4], [0.6, 0.8]], requires_grad=True)  # mean 0.5
    b = torch.tensor([[0.0, 0.1, 0.2, 0.3]], requires_grad=True)  # mean 0.15
    loss = budget_loss([a, b], target=0.25, weight=2.0)
    assert loss.item() == pytest.approx(2.0 * ((0.5 - 0.25) ** 2 + (0.15 - 0.25) ** 2) / 2)
    loss.backward()
    # d/dα of w · mean_b (m_b - F)² = w · 2 (m_b - F) / (blocks · n_b)
    assert torch.allclose(a.grad, torch.full_like(a, 2.0 * 2 * 0.25 / (2 * 4)))
    assert torch.allclose(b.grad, torch.full_like(b, 2.0 * 2 * -0.1 / (2 * 4)))
    assert budget_loss([a.detach()], 0.5, 3.0).item() == 0.0


def test_the_model_adds_the_budget_term_only_with_a_budget():
    model = esh.create_model("esh_vision_nano", num_classes=3)
    model(torch.randn(2, 3, 32, 32))
    assert "loss_budget" not in model.auxiliary_losses(0)
    model.set_routing_terms(routing_budget=0.25, routing_budget_weight=4.0)
    terms = model.auxiliary_losses(0)
    assert torch.allclose(terms["loss_budget"], budget_loss(model._last_aux["alphas"], 0.25, 4.0))
    with pytest.raises(InputError, match="routing_budget is an attention fraction"):
        model.set_routing_terms(routing_budget=1.5)
    with pytest.raises(InputError, match="unknown routing terms"):
        model.set_routing_terms(ponder_warmup=0.3)


def _alpha_means(run) -> list[float]:
    with open(run / "steps.csv") as f:
        return [float(r["alpha_mean"]) for r in csv.DictReader(f)]


def test_a_short_run_with_a_budget_pulls_the_mean_alpha_towards_it(tmp_path):
    common = dict(epochs=2, log_interval=1, lr=1e-2, alpha_var_weight=0.0)  # 12 steps
    train(_cfg(tmp_path, out=str(tmp_path / "free"), **common))
    train(_cfg(tmp_path, out=str(tmp_path / "budget"), routing_budget=0.05, routing_budget_weight=20.0, **common))
    free, budget = _alpha_means(tmp_path / "free"), _alpha_means(tmp_path / "budget")
    assert free[0] == pytest.approx(budget[0], abs=1e-6)  # the same start (same seed, same batch)
    assert budget[-1] < budget[0] - 0.08  # moved towards 0.05
    assert abs(budget[-1] - 0.05) < abs(free[-1] - 0.05) - 0.05
    with open(tmp_path / "budget" / "steps.csv") as f:
        assert float(next(csv.DictReader(f))["loss_budget"]) > 0


# --- esh train's options ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ponder-warmup", "1.5"], "ponder_warmup must be a fraction of the run's optimizer steps"),
        (["--ponder-ramp", "-1"], "ponder_ramp must be a fraction"),
        (["--routing-budget", "2"], "routing_budget must be a finite number >= 0 and <= 1"),
        (["--alpha-var-weight", "-1"], "alpha_var_weight must be a finite number >= 0"),
        (["--model", "mambavision_nano", "--ponder-weight", "0.1"], "has no routing terms"),
    ],
)
def test_bad_routing_options_are_one_line_errors(tmp_path, capsys, args, message):
    data = _small_npz(tmp_path / "small.npz")
    out = tmp_path / "run"
    base = ["train", "--model", "esh_vision_nano", "--data", str(data), "--batch-size", "8", "--out", str(out)]
    assert main([*base, "--max-steps", "1", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_esh_train_takes_the_schedule_as_a_fraction(tmp_path, capsys):
    data = _small_npz(tmp_path / "small.npz")
    out = tmp_path / "run"
    args = ["train", "--model", "esh_vision_nano", "--img-size", "32", "--data", str(data), "--batch-size", "8"]
    args += ["--out", str(out), "--epochs", "1", "--max-steps", "4", "--log-interval", "1"]
    args += ["--ponder-warmup", "0.5", "--ponder-ramp", "0", "--ponder-weight", "0.3", "--routing-budget", "0.25"]
    assert main(args) == 0
    with open(out / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["ponder_weight"]) for r in rows] == [0.0, 0.0, 0.3, 0.3]  # warm-up: 2 of the 4 steps
    assert all(float(r["loss_budget"]) >= 0 for r in rows)
