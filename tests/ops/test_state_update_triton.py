"""The Triton step equals the reference step. On CPU these run in Triton's interpreter, which
checks the kernel's semantics, not its code generation: ``TRITON_INTERPRET=1 pytest <this file>``
(CI runs it so, in its own invocation); the normal suite skips the module."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

from scan_inputs import scan_inputs  # noqa: E402

from esh.ops import selective_state_update  # noqa: E402
from esh.ops.selective_scan import selective_scan_reference, selective_state_update_reference  # noqa: E402
from esh.ops.selective_scan import triton_state_update as triton_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def step_inputs(
    batch=2,
    heads: int | None = None,
    dim=6,
    n=4,
    groups=1,
    dtype=torch.float32,
    state_dtype=torch.float32,
    with_D=True,
    with_z=True,
    with_dt_bias=True,
    seed=0,
) -> dict:
    """One step's arguments; ``heads=None`` is the (batch, dim, N) form."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)

    lead = (dim,) if heads is None else (heads, dim)
    bc = (batch, n) if heads is None else (batch, groups, n)
    return dict(
        state=rnd(batch, *lead, n, dtype=state_dtype),
        x=rnd(batch, *lead, dtype=dtype),
        dt=rnd(batch, *lead, dtype=dtype),
        A=-rnd(*lead, n).abs(),
        B=rnd(*bc, dtype=dtype),
        C=rnd(*bc, dtype=dtype),
        D=rnd(*lead) if with_D else None,
        z=rnd(batch, *lead, dtype=dtype) if with_z else None,
        dt_bias=rnd(*lead) if with_dt_bias else None,
        dt_softplus=True,
    )


def assert_triton_step_matches_reference(args: dict, **tolerance) -> None:
    ref_state = args["state"].clone()
    expected = selective_state_update_reference(**{**args, "state": ref_state})
    out = selective_state_update(**args, backend="triton")
    assert out.dtype == args["x"].dtype and args["state"].dtype == ref_state.dtype
    torch.testing.assert_close(out, expected, **tolerance)
    torch.testing.assert_close(args["state"], ref_state, **tolerance)


@pytest.mark.parametrize("heads", [None, 3], ids=["dim_form", "head_form"])
def test_both_state_forms_equal_the_reference_step(heads):
    assert_triton_step_matches_reference(step_inputs(heads=heads))


@pytest.mark.parametrize("n", [1, 4, 16])
def test_state_sizes_equal_the_reference_step(n):
    assert_triton_step_matches_reference(step_inputs(heads=2, dim=3, n=n))


def test_channels_not_a_multiple_of_the_block_equal_the_reference_step():
    block_d = triton_step._blocks(40, 16)[0]
    assert 40 % block_d and block_d < 40  # two programs per head, the second partly masked
    assert_triton_step_matches_reference(step_inputs(batch=1, dim=40, n=16))


@pytest.mark.parametrize("b_groups,c_groups", [(2, 2), (1, 4), (4, 2)])
def test_groups_of_B_and_C_equal_the_reference_step(b_groups, c_groups):
    args = step_inputs(heads=4, dim=2, groups=b_groups)
    args["C"] = torch.randn(2, c_groups, 4, device=DEVICE)
    assert_triton_step_matches_reference(args)


@pytest.mark.parametrize("with_D", [False, True])
@pytest.mark.parametrize("with_dt_bias", [False, True])
@pytest.mark.parametrize("with_z", [False, True])
def test_optional_D_dt_bias_and_z_may_be_none(with_D, with_dt_bias, with_z):
    args = step_inputs(heads=2, dim=3, with_D=with_D, with_dt_bias=with_dt_bias, with_z=with_z)
    assert_triton_step_matches_reference(args)


@pytest.mark.parametrize("softplus", [False, True])
def test_softplus_on_and_off_across_its_threshold(softplus):
    args = step_inputs(batch=1, dim=8, with_dt_bias=False)
    # exp underflows, tiny, moderate, at and past torch's threshold of 20
    args["dt"] = torch.tensor([[-120.0, -30.0, -3.0, 0.0, 0.5, 19.5, 20.0, 25.0]], device=DEVICE)
    args["A"] = args["A"] * 0.01  # keep exp(dt * A) away from 0 for the large steps
    args["dt_softplus"] = softplus
    assert_triton_step_matches_reference(args)


def test_broadcast_A_dt_D_and_dt_bias_as_mamba2_passes_them_equal_the_reference_step():
    batch, heads, p, n = 2, 3, 4, 5
    args = step_inputs(batch=batch, heads=heads, dim=p, n=n, groups=1)
    args["A"] = (-torch.rand(heads, device=DEVICE))[:, None, None].expand(heads, p, n)
    args["dt"] = torch.randn(batch, heads, device=DEVICE)[..., None].expand(batch, heads, p)
    args["D"] = torch.randn(heads, device=DEVICE)[:, None].expand(heads, p)
    args["dt_bias"] = torch.randn(heads, device=DEVICE)[:, None].expand(heads, p)
    assert triton_step._tied_over_dim(args["A"], args["dt"], args["dt_bias"])  # the one-exp-per-head path
    assert_triton_step_matches_reference(args)


def test_stride_zero_A_with_per_channel_dt_equals_the_reference_step():
    args = step_inputs(heads=2, dim=3, n=4)
    args["A"] = -torch.rand(2, 1, 4, device=DEVICE).expand(2, 3, 4)
    assert not triton_step._tied_over_dim(args["A"], args["dt"], args["dt_bias"])
    assert_triton_step_matches_reference(args)


@pytest.mark.parametrize(
    "dtype,state_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)],
)
def test_half_precision_inputs_compute_in_float32_and_keep_the_state_dtype(dtype, state_dtype):
    args = step_inputs(heads=2, dim=3, dtype=dtype, state_dtype=state_dtype)
    assert_triton_step_matches_reference(args, rtol=1.6e-2, atol=1e-2)


def test_float64_inputs_compute_in_float64():
    args = step_inputs(heads=2, dim=3, dtype=torch.float64, state_dtype=torch.float64)
    args = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    assert_triton_step_matches_reference(args, rtol=1e-12, atol=1e-12)


def test_the_state_is_updated_in_place_through_a_strided_view():
    cache = torch.randn(2, 3, 6, 8, device=DEVICE)
    state = cache[:, 1, :, ::2]  # a non-contiguous view into a larger buffer
    before = cache.clone()
    args = step_inputs(dim=6, n=4)
    args["state"] = state
    expected_state = state.clone()
    expected = selective_state_update_reference(**{**args, "state": expected_state})
    pointer = state.data_ptr()
    out = selective_state_update(**args, backend="triton")
    torch.testing.assert_close(out, expected)
    assert state.data_ptr() == pointer
    torch.testing.assert_close(cache[:, 1, :, ::2], expected_state)
    untouched = torch.ones_like(cache, dtype=torch.bool)
    untouched[:, 1, :, ::2] = False
    assert torch.equal(cache[untouched], before[untouched])


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("heads", [None, 2], ids=["dim_form", "head_form"])
def test_state_batch_indices_with_padding_equal_the_reference_on_a_cache(heads, index_dtype):
    args = step_inputs(batch=3, heads=heads, dim=3, n=4, state_dtype=torch.bfloat16)
    args["state"] = torch.randn(6, *args["state"].shape[1:], device=DEVICE).to(torch.bfloat16)
    indices = torch.tensor([4, -1, 1], dtype=index_dtype, device=DEVICE)
    ref_cache = args["state"].clone()
    before = args["state"].clone()
    expected = selective_state_update(**{**args, "state": ref_cache}, state_batch_indices=indices, backend="reference")
    out = selective_state_update(**args, state_batch_indices=indices, backend="triton")
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(args["state"], ref_cache, rtol=1.6e-2, atol=1e-2)
    untouched = torch.tensor([0, 2, 3, 5], device=DEVICE)
    assert torch.equal(args["state"][untouched], before[untouched])


def test_stepping_through_a_sequence_equals_the_reference_scan():
    x = scan_inputs(batch=2, dim=6, seqlen=8, dstate=4, with_z=True, with_D=True, seed=1)
    x = {k: None if v is None else v.to(DEVICE) for k, v in x.items()}
    out, last = selective_scan_reference(**x, delta_softplus=True, return_last_state=True)
    state = torch.zeros(2, 6, 4, device=DEVICE)
    steps = [
        selective_state_update(
            state,
            x["u"][..., t],
            x["delta"][..., t],
            x["A"],
            x["B"][..., t],
            x["C"][..., t],
            D=x["D"],
            z=x["z"][..., t],
            dt_bias=x["delta_bias"],
            dt_softplus=True,
            backend="triton",
        )
        for t in range(8)
    ]
    torch.testing.assert_close(torch.stack(steps, -1), out)
    torch.testing.assert_close(state, last)


def test_the_environment_variable_picks_the_triton_step(monkeypatch):
    from esh.ops.selective_scan import state_update

    def no_reference(*args):
        raise AssertionError("the reference step ran")

    monkeypatch.setattr(state_update, "selective_state_update_reference", no_reference)
    monkeypatch.setenv("ESH_SCAN_BACKEND", "triton")
    args = step_inputs(heads=2, dim=3)
    ref_state = args["state"].clone()
    expected = selective_state_update_reference(**{**args, "state": ref_state})
    torch.testing.assert_close(selective_state_update(**args), expected)
    torch.testing.assert_close(args["state"], ref_state)
