"""The shared vision builder: argument checks, input dtypes, stochastic-depth rates and block
checkpointing written once for every family."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import esh
from esh.errors import InputError
from esh.models._builder import UnexpectedArgumentError, call_block, drop_path_rates

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {
    "vim_tiny": (dict(depth=1, embed_dim=8, img_size=32, d_state=4, num_classes=3), 32),
    "mambavision_nano": (dict(num_classes=3), 32),
    "esh_vision_nano": (dict(num_classes=3), 32),
}


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(img_size=0), "img_size must be a positive int"),
        (dict(img_size=(32, -1)), "img_size must be a positive int"),
        (dict(num_classes=-1), "num_classes must be an int >= 0"),
        (dict(num_classes=2.5), "num_classes must be an int >= 0"),
        (dict(in_chans=0), "in_chans must be an int >= 1"),
        (dict(drop_path_rate=1.5), r"drop_path_rate must be a number in \[0, 1\)"),
    ],
)
def test_impossible_model_arguments_are_input_errors(name, bad, message):
    with pytest.raises(InputError, match=message):
        esh.create_model(name, **bad)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_an_unknown_argument_names_the_close_match(name):
    with pytest.raises(UnexpectedArgumentError, match=r"unexpected arguments.*num_clases.*did you mean num_classes"):
        esh.create_model(name, num_clases=3)
    with pytest.raises(TypeError):  # still the TypeError Python gives for an unknown keyword
        esh.create_model(name, foo=1)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_floating_inputs_are_cast_to_the_model_dtype(name, dtype):
    kwargs, size = SMALL[name]
    model = esh.create_model(name, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        want = model(x)
        got = model(x.to(dtype))
    assert got.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float64 else 0.1
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_integer_images_say_they_must_be_normalised(name):
    kwargs, size = SMALL[name]
    model = esh.create_model(name, **kwargs)
    with pytest.raises(InputError, match=r"floating-point images.*torch\.uint8"):
        model(torch.zeros(1, 3, size, size, dtype=torch.uint8))


def test_mambavision_reset_classifier_checks_global_pool():
    model = esh.create_model("mambavision_nano", num_classes=3)
    with pytest.raises(InputError, match=r"global_pool must be 'avg' or ''"):
        model.reset_classifier(5, global_pool="max")
    assert model.global_pool == "avg" and model.num_classes == 3  # unchanged by the refusal
    model.reset_classifier(5, global_pool="")
    assert model.global_pool == "" and model.get_classifier().out_features == 5


def test_drop_path_rates_rise_linearly_over_all_blocks():
    assert drop_path_rates(0.0, (2, 1)) == [[0.0, 0.0], [0.0]]
    rates = drop_path_rates(0.3, (1, 2, 1))
    assert [len(r) for r in rates] == [1, 2, 1]
    torch.testing.assert_close(torch.tensor(sum(rates, [])), torch.linspace(0, 0.3, 4))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_family_takes_its_drop_path_rates_from_the_shared_schedule(name):
    kwargs, _ = SMALL[name]
    model = esh.create_model(name, **{**kwargs, "drop_path_rate": 0.2})
    got = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert got and max(got) == pytest.approx(0.2)
    assert got == sorted(got)


def test_call_block_checkpoints_only_when_asked_and_recording_a_gradient(monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    block = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    call_block(block, x, checkpointing=True).sum().backward()
    assert calls == [1] and block.weight.grad is not None
    with torch.no_grad():
        call_block(block, x, checkpointing=True)
    call_block(block, x, checkpointing=False)
    assert calls == [1]
