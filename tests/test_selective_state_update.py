"""One recurrent step, tested against the scan."""

from __future__ import annotations

import pytest
import torch
from scan_inputs import scan_inputs

from esh.ops import selective_scan, selective_state_update
from esh.ops.selective_scan import selective_state_update_reference


@pytest.mark.parametrize("with_z", [False, True])
@pytest.mark.parametrize("with_D", [False, True])
def test_stepping_through_a_sequence_equals_the_scan(with_z, with_D):
    x = scan_inputs(batch=2, dim=6, seqlen=25, dstate=4, with_z=with_z, with_D=with_D, dtype=torch.float64)
    out, last = selective_scan(**x, delta_softplus=True, return_last_state=True)
    state = torch.zeros(2, 6, 4, dtype=torch.float64)
    steps = []
    for t in range(25):
        steps.append(
            selective_state_update(
                state,
                x["u"][..., t],
                x["delta"][..., t],
                x["A"],
                x["B"][..., t],
                x["C"][..., t],
                D=x["D"],
                z=None if x["z"] is None else x["z"][..., t],
                dt_bias=x["delta_bias"],
                dt_softplus=True,
            )
        )
    torch.testing.assert_close(torch.stack(steps, -1), out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state, last, rtol=1e-10, atol=1e-12)


def test_continuing_from_the_scan_last_state():
    x = scan_inputs(batch=1, dim=4, seqlen=12, dstate=3, dtype=torch.float64)
    full = selective_scan(**x, delta_softplus=True)
    head = {k: (v[..., :11] if v is not None and v.dim() == 3 else v) for k, v in x.items()}
    _, state = selective_scan(**head, delta_softplus=True, return_last_state=True)
    y = selective_state_update(
        state,
        x["u"][..., 11],
        x["delta"][..., 11],
        x["A"],
        x["B"][..., 11],
        x["C"][..., 11],
        D=x["D"],
        z=x["z"][..., 11],
        dt_bias=x["delta_bias"],
        dt_softplus=True,
    )
    torch.testing.assert_close(y, full[..., 11])


def test_multi_head_form_with_groups_equals_per_head_steps():
    batch, heads, dim, n, groups = 2, 4, 3, 5, 2
    g = torch.Generator().manual_seed(0)
    state = torch.randn(batch, heads, dim, n, generator=g, dtype=torch.float64)
    x = torch.randn(batch, heads, dim, generator=g, dtype=torch.float64)
    dt = torch.rand(batch, heads, dim, generator=g, dtype=torch.float64)
    A = -torch.rand(heads, dim, n, generator=g, dtype=torch.float64)
    B = torch.randn(batch, groups, n, generator=g, dtype=torch.float64)
    C = torch.randn(batch, groups, n, generator=g, dtype=torch.float64)
    D = torch.randn(heads, dim, generator=g, dtype=torch.float64)
    expected_state = state.clone()
    outs = []
    for h in range(heads):
        s = expected_state[:, h].clone()
        outs.append(
            selective_state_update(s, x[:, h], dt[:, h], A[h], B[:, h // 2], C[:, h // 2], D=D[h], dt_softplus=True)
        )
        expected_state[:, h] = s
    out = selective_state_update(state, x, dt, A, B, C, D=D, dt_softplus=True)
    torch.testing.assert_close(out, torch.stack(outs, 1))
    torch.testing.assert_close(state, expected_state)


def test_half_precision_step_returns_input_dtype():
    state = torch.zeros(1, 4, 2)
    x = torch.randn(1, 4, dtype=torch.bfloat16)
    out = selective_state_update(state, x, x.abs(), -torch.ones(4, 2), torch.randn(1, 2), torch.randn(1, 2))
    assert out.dtype == torch.bfloat16
    assert state.abs().sum() > 0


def test_public_step_is_the_reference_step_on_cpu():
    state = torch.randn(2, 3, 4)
    args = (torch.randn(2, 3), torch.rand(2, 3), -torch.rand(3, 4), torch.randn(2, 4), torch.randn(2, 4))
    s2 = state.clone()
    torch.testing.assert_close(selective_state_update(state, *args), selective_state_update_reference(s2, *args))
    torch.testing.assert_close(state, s2)


@pytest.mark.parametrize(
    "field,bad,message",
    [
        ("x", torch.randn(2, 5), r"x must have shape \(batch, dim\) = \(2, 3\)"),
        ("A", torch.randn(3, 5), r"A must have shape \(dim, N\) = \(3, 4\)"),
        ("B", torch.randn(2, 3), r"B must have shape \(batch, N\) = \(2, 4\)"),
        ("state", torch.randn(2, 3), r"state must be \(batch, dim, N\)"),
    ],
)
def test_step_shape_errors(field, bad, message):
    args = dict(
        state=torch.zeros(2, 3, 4),
        x=torch.randn(2, 3),
        dt=torch.rand(2, 3),
        A=-torch.rand(3, 4),
        B=torch.randn(2, 4),
        C=torch.randn(2, 4),
    )
    args[field] = bad
    with pytest.raises(ValueError, match=message):
        selective_state_update(**args)
