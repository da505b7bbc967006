"""Bad input to the scan is a ValueError that names what was expected."""

from __future__ import annotations

import pytest
import torch
from scan_inputs import scan_inputs

from esh.ops import selective_scan


def _inputs():
    return scan_inputs(batch=2, dim=6, seqlen=9, dstate=4)


@pytest.mark.parametrize(
    "name,bad,message",
    [
        ("u", torch.randn(2, 6), r"u must have shape \(batch, dim, L\)"),
        ("delta", torch.randn(2, 6, 8), r"delta must have the shape of u, \(batch, dim, L\) = \(2, 6, 9\)"),
        ("A", torch.randn(5, 4), r"A must have shape \(dim, N\) = \(6, N\); got \(5, 4\)"),
        ("B", torch.randn(2, 4, 8), r"B must have shape \(dim, N\) = \(6, 4\), \(batch, N, L\) = \(2, 4, 9\)"),
        ("C", torch.randn(2, 5, 4, 9), r"C must have shape .*G dividing dim=6; got \(2, 5, 4, 9\)"),
        ("D", torch.randn(5), r"D must have shape \(dim,\) = \(6,\); got \(5,\)"),
        ("z", torch.randn(2, 6, 10), r"z must have the shape of u"),
        ("delta_bias", torch.randn(6, 1), r"delta_bias must have shape \(dim,\)"),
        (
            "initial_state",
            torch.randn(2, 6, 5),
            r"initial_state must have shape \(batch, dim, N\) = \(2, 6, 4\); got \(2, 6, 5\)",
        ),
        ("initial_state", torch.randn(6, 4), r"initial_state must have shape \(batch, dim, N\)"),
    ],
)
def test_wrong_shapes_name_the_expected_shape(name, bad, message):
    x = _inputs()
    x[name] = bad
    with pytest.raises(ValueError, match=message):
        selective_scan(**x)


def test_complex_A_is_rejected():
    x = _inputs()
    x["A"] = torch.complex(x["A"], x["A"])
    with pytest.raises(ValueError, match="A is complex"):
        selective_scan(**x)


def test_integer_input_is_rejected():
    x = _inputs()
    x["u"] = torch.ones(2, 6, 9, dtype=torch.long)
    with pytest.raises(ValueError, match="u must be a floating-point tensor"):
        selective_scan(**x)


def test_non_tensor_is_rejected():
    x = _inputs()
    x["B"] = [[1.0]]
    with pytest.raises(ValueError, match="B must be a torch.Tensor"):
        selective_scan(**x)


def test_mixed_devices_are_rejected():
    x = _inputs()
    x["C"] = x["C"].to("meta")
    with pytest.raises(ValueError, match="one device.*C on meta"):
        selective_scan(**x)


def test_empty_sequence_is_rejected():
    x = scan_inputs(seqlen=0) if False else _inputs()
    x = {k: (v[..., :0] if v is not None and v.dim() >= 3 else v) for k, v in x.items()}
    with pytest.raises(ValueError, match="at least 1"):
        selective_scan(**x)


@pytest.mark.parametrize(
    "bad,message",
    [
        (torch.zeros(2, 6, 4, dtype=torch.long), "initial_state must be a floating-point tensor"),
        (torch.zeros(2, 6, 4, dtype=torch.complex64), "initial_state is complex"),
        (torch.zeros(2, 6, 4, device="meta"), "one device.*initial_state on meta"),
        ([[0.0]], "initial_state must be a torch.Tensor"),
    ],
)
def test_bad_initial_state_is_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        selective_scan(**_inputs(), initial_state=bad)
