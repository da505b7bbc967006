"""The Triton selective scan equals the float64 reference loop, in values and gradients.

Runs on CUDA, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported; CI runs this module in its own pytest invocation with it). Shapes are tiny
because the interpreter takes milliseconds per program step.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set before triton is imported)", allow_module_level=True)

from scan_inputs import run_with_grads, scan_inputs  # noqa: E402

from esh.ops.selective_scan.reference import selective_scan_reference  # noqa: E402
from esh.ops.selective_scan.triton_scan import is_available, selective_scan_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("one_thread")


def reference(**x):
    """selective_scan_reference in float64 on float64 copies of the inputs."""
    x = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    return selective_scan_reference(**x)


def make_inputs(*, initial_state=True, **kwargs):
    x = scan_inputs(**kwargs)
    if initial_state:
        g = torch.Generator().manual_seed(7)
        batch, dim, _ = x["u"].shape
        x["initial_state"] = torch.randn(batch, dim, x["A"].shape[1], generator=g)
    return {k: None if v is None else v.to(DEVICE) for k, v in x.items()}


def assert_matches_reference(x, rtol=1e-4, atol=1e-4, delta_softplus=True, **kwargs):
    """Output, last state and every gradient against the float64 reference; returns the run."""
    got = run_with_grads(selective_scan_triton, x, delta_softplus=delta_softplus, **kwargs)
    want = run_with_grads(reference, x, delta_softplus=delta_softplus)
    out, last, grads = got
    assert out.dtype == x["u"].dtype and last.dtype == torch.float32
    for name, a, b in [("out", out, want[0]), ("last state", last, want[1])] + [
        (f"grad {k}", grads[k], want[2][k]) for k in want[2]
    ]:
        assert torch.isfinite(a).all(), name
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(
            a.double(), b.double(), rtol=rtol, atol=atol * scale, msg=lambda m, n=name: f"{n}: {m}"
        )
    for k, v in x.items():
        if v is not None:
            assert grads[k].dtype == v.dtype and grads[k].shape == v.shape, k
    return got


def test_is_available():
    assert is_available()


@pytest.mark.parametrize(
    "B_mode, C_mode",
    [("variable", "variable"), ("grouped", "grouped"), ("constant", "constant"), ("constant", "grouped")],
)
def test_matches_reference_for_each_kind_of_B_and_C(B_mode, C_mode):
    x = make_inputs(batch=2, dim=24, seqlen=33, dstate=4, B_mode=B_mode, C_mode=C_mode, groups=3)
    assert_matches_reference(x, checkpoint_every=8, block_d=16)


def test_B_and_C_with_different_group_counts():
    # 24 channels: B in 2 groups of 12, C in 3 groups of 8; blocks of 16 straddle B's groups
    x = make_inputs(batch=2, dim=24, seqlen=17, dstate=4)
    g = torch.Generator().manual_seed(3)
    x["B"] = torch.randn(2, 2, 4, 17, generator=g).to(DEVICE)
    x["C"] = torch.randn(2, 3, 4, 17, generator=g).to(DEVICE)
    assert_matches_reference(x, checkpoint_every=8, block_d=16)


@pytest.mark.parametrize("groups", [1, 5])
def test_dim_not_a_multiple_of_the_channel_block(groups):
    x = make_inputs(batch=1, dim=40, seqlen=17, dstate=4, B_mode="grouped", C_mode="grouped", groups=groups)
    assert_matches_reference(x, checkpoint_every=8, block_d=16)


@pytest.mark.parametrize("seqlen, dstate", [(1, 4), (17, 1), (33, 16), (70, 4)])
def test_sequence_lengths_across_checkpoints_and_state_sizes(seqlen, dstate):
    x = make_inputs(batch=2, dim=8, seqlen=seqlen, dstate=dstate)
    assert_matches_reference(x, checkpoint_every=8)


def test_sequence_major_inputs_keep_their_layout():
    """u, delta, z as (batch, dim, L) views of (batch, L, dim) memory, used without copies."""
    x = make_inputs(batch=2, dim=12, seqlen=17, dstate=4)
    for k in ("u", "delta", "z"):
        x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
    out, _, grads = assert_matches_reference(x, checkpoint_every=8)
    for k in ("u", "delta", "z"):
        assert grads[k].stride() == x[k].stride(), k
    assert out.stride() == x["u"].stride()


def test_sequence_split_equals_the_plain_scan():
    x = make_inputs(batch=1, dim=8, seqlen=70, dstate=4)
    split = assert_matches_reference(x, checkpoint_every=8, split_segments=3)
    plain = run_with_grads(selective_scan_triton, x, delta_softplus=True, checkpoint_every=8)
    torch.testing.assert_close(split[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split[1], plain[1], rtol=1e-5, atol=1e-5)
    for k in plain[2]:
        torch.testing.assert_close(split[2][k], plain[2][k], rtol=1e-4, atol=1e-4, msg=k)


@pytest.mark.parametrize("delta_softplus", [False, True])
def test_underflowing_decays_stay_finite_and_exact(delta_softplus):
    # steps of ~100-1000 with A in [-2.1, -0.1]: exp(delta * A) underflows to exactly 0
    x = make_inputs(batch=1, dim=8, seqlen=33, dstate=4, delta_scale=1000.0, with_bias=False)
    assert_matches_reference(x, delta_softplus=delta_softplus, checkpoint_every=8, split_segments=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    x = make_inputs(batch=1, dim=8, seqlen=17, dstate=4, dtype=dtype)
    x["initial_state"] = x["initial_state"].float()
    assert_matches_reference(x, rtol=2e-2, atol=2e-2, checkpoint_every=8)


def test_without_D_z_bias_softplus_or_initial_state():
    x = make_inputs(
        batch=2, dim=8, seqlen=17, dstate=4, with_D=False, with_z=False, with_bias=False, initial_state=False
    )
    assert_matches_reference(x, delta_softplus=False, checkpoint_every=8)


def test_output_alone_is_differentiable():
    x = {k: None if v is None else v.requires_grad_() for k, v in make_inputs(dim=8, seqlen=17).items()}
    selective_scan_triton(**x, delta_softplus=True, checkpoint_every=8).sum().backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in x.values() if v is not None)


def test_inference_under_no_grad():
    x = make_inputs(batch=1, dim=8, seqlen=33, dstate=4)
    with torch.no_grad():
        out, last = selective_scan_triton(
            **x, delta_softplus=True, return_last_state=True, checkpoint_every=8, split_segments=2
        )
    want_out, want_last = reference(**x, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last.double(), want_last, rtol=1e-4, atol=1e-4)


def test_backward_is_deterministic():
    x = make_inputs(batch=2, dim=24, seqlen=17, dstate=4, B_mode="grouped", C_mode="variable", groups=3)
    runs = [run_with_grads(selective_scan_triton, x, checkpoint_every=8, block_d=16)[2] for _ in range(2)]
    for k in ("B", "C", "A", "initial_state"):
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_float64_is_rejected():
    x = make_inputs(dim=4, seqlen=3, dtype=torch.float64, initial_state=False)
    with pytest.raises(ValueError, match="float64"):
        selective_scan_triton(**x)


@pytest.mark.parametrize("split_segments", [None, 8], ids=["auto", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_long_sequences_on_cuda(dtype, split_segments):
    x = make_inputs(batch=1, dim=256, seqlen=1000, dstate=16, dtype=dtype)
    x["initial_state"] = x["initial_state"].float()
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    assert_matches_reference(x, rtol=tol, atol=tol, split_segments=split_segments)


def test_the_dispatcher_runs_it_when_asked_by_argument_or_environment(monkeypatch):
    from esh.ops import selective_scan

    x = make_inputs(dim=8, seqlen=9, dstate=4)
    got = run_with_grads(selective_scan, x, delta_softplus=True, backend="triton")
    want = run_with_grads(selective_scan_triton, x, delta_softplus=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for name in want[2]:
        assert torch.equal(got[2][name], want[2][name]), name
    monkeypatch.setenv("ESH_SCAN_BACKEND", "triton")
    assert torch.equal(selective_scan(**x, delta_softplus=True), want[0])
