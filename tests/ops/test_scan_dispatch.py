"""Which backend a scan takes on a GPU, and the scan as one node under torch.compile.

No GPU here: the CUDA choices are checked with the availability probes patched, the kernels
themselves in test_scan_triton.py (Triton's interpreter) and on a GPU by scripts/gpu_check.sh."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from scan_inputs import scan_inputs, with_grad

from esh.ops import BackendUnavailableError, selective_scan
from esh.ops.selective_scan import mamba_cuda, triton_scan

dispatch = importlib.import_module("esh.ops.selective_scan")


@pytest.fixture
def no_forced_backend(monkeypatch):
    monkeypatch.delenv("ESH_SCAN_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "_warned_no_gpu_kernel", False)


@pytest.mark.parametrize(
    "mamba_ssm, triton, expected", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "triton")]
)
def test_default_on_cuda_is_mamba_ssm_then_triton(monkeypatch, no_forced_backend, mamba_ssm, triton, expected):
    monkeypatch.setattr(mamba_cuda, "is_available", lambda: mamba_ssm)
    monkeypatch.setattr(triton_scan, "is_available", lambda: triton)
    assert dispatch.resolve_backend(None, "cuda") == expected
    assert dispatch.resolve_backend(None, "cpu") == "chunked"  # (the C kernel then takes what it can)


def test_without_a_gpu_kernel_cuda_scans_run_chunked_with_one_warning(monkeypatch, no_forced_backend):
    monkeypatch.setattr(mamba_cuda, "is_available", lambda: False)
    monkeypatch.setattr(triton_scan, "is_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="pip install triton"):
        assert dispatch.resolve_backend(None, "cuda") == "chunked"
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        assert dispatch.resolve_backend(None, "cuda") == "chunked"  # once only


def _mixed_groups(**kw):
    """Inputs whose B has one group and C three (every backend but mamba_ssm's runs them)."""
    x = scan_inputs(seqlen=5, B_mode="grouped", C_mode="grouped", groups=3, **kw)
    return dict(x, B=x["B"][:, :1])


def test_mamba_ssm_takes_only_the_inputs_its_kernel_runs():
    x = scan_inputs(seqlen=5, B_mode="grouped", C_mode="grouped", groups=3)
    assert mamba_cuda.unsupported_reason(x["u"], x["delta"], x["B"], x["C"], x["z"], None) is None
    mixed = _mixed_groups()
    assert "same number of groups" in mamba_cuda.unsupported_reason(x["u"], x["delta"], mixed["B"], x["C"], None, None)
    assert "initial_state" in mamba_cuda.unsupported_reason(x["u"], x["delta"], x["B"], x["C"], None, x["u"])
    assert "float64" in mamba_cuda.unsupported_reason(x["u"].double(), x["delta"].double(), x["B"], x["C"], None, None)


@pytest.mark.parametrize("triton, expected", [(True, "triton"), (False, "chunked")])
def test_inputs_mamba_ssm_cannot_run_fall_through_to_triton_then_chunked(monkeypatch, triton, expected):
    calls = []
    for name in ("cuda", "triton", "chunked"):
        monkeypatch.setitem(dispatch._IMPLS, name, lambda *a, _n=name, **k: calls.append(_n) or a[0])
    monkeypatch.setattr(dispatch, "_resolve", lambda backend, device_type: ("cuda", False))
    monkeypatch.setattr(triton_scan, "is_available", lambda: triton)
    selective_scan(**scan_inputs(seqlen=5))
    selective_scan(**_mixed_groups())
    assert calls == ["cuda", expected]


def test_asking_for_a_backend_that_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dispatch, "_resolve", lambda backend, device_type: ("cuda", True))
    x = _mixed_groups()
    with pytest.raises(ValueError, match="mamba_ssm's kernel: B and C must have the same number of groups"):
        selective_scan(**x)
    monkeypatch.setattr(dispatch, "_resolve", lambda backend, device_type: ("triton", True))
    with pytest.raises(ValueError, match="backend 'triton' cannot run these inputs: .*float64"):
        selective_scan(**{k: None if v is None else v.double() for k, v in x.items()})


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs CPU tensors")
def test_triton_on_cpu_tensors_is_unavailable_outside_the_interpreter():
    with pytest.raises(BackendUnavailableError, match="backend 'triton' is unavailable"):
        selective_scan(**scan_inputs(seqlen=5), backend="triton")
    assert "triton" not in dispatch.available_backends("cpu")


def _loss(u, delta, A, B, C, D, z, delta_bias):
    return (selective_scan(u * 2, delta, A, B, C, D, z, delta_bias, True) * 3).sum()


def test_a_compiled_scan_is_one_graph_and_gives_the_eager_gradients():
    x = {k: v for k, v in scan_inputs(seqlen=9).items() if v is not None}
    explained = torch._dynamo.explain(_loss)(**x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    eager, compiled = with_grad(x), with_grad(x)
    _loss(**eager).backward()
    torch._dynamo.reset()
    torch.compile(_loss, fullgraph=True, backend="aot_eager")(**compiled).backward()
    for name in x:
        torch.testing.assert_close(compiled[name].grad, eager[name].grad, msg=name)


def test_the_compiled_scan_returns_the_last_state_and_takes_an_initial_state():
    x = {k: v for k, v in scan_inputs(seqlen=6).items() if v is not None}
    h0 = torch.randn(x["u"].shape[0], x["u"].shape[1], x["A"].shape[1])

    def run(x, h0):
        return selective_scan(**x, delta_softplus=True, return_last_state=True, initial_state=h0)

    torch._dynamo.reset()
    out, last = torch.compile(run, fullgraph=True, backend="aot_eager")(x, h0)
    expected_out, expected_last = run(x, h0)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(last, expected_last)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, kwargs, size",
    [("vim_tiny", dict(img_size=32, depth=2), 32), ("mambavision_nano", dict(img_size=64), 64)],
)
def test_mamba_models_compile_to_one_graph(name, kwargs, size):
    import esh

    model = esh.create_model(name, num_classes=10, **kwargs).eval()
    explained = torch._dynamo.explain(model)(torch.randn(1, 3, size, size))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_the_mamba_ssm_pass_through_gives_its_kernel_what_it_checks_for(monkeypatch):
    """A stand-in with selective_scan_fn's TORCH_CHECKs (dtypes, unit stride along L, float32
    A/D/delta_bias) that computes with the reference: mixed dtypes and Vim's sequence-major
    views reach it as it requires, and the result is the scan's."""
    from esh.ops.selective_scan.reference import selective_scan_reference

    seen = {}

    def kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        assert u.dtype in (torch.float32, torch.float16, torch.bfloat16) and A.dtype == torch.float32
        for name, t in (("delta", delta), ("z", z), ("B", B), ("C", C)):
            wanted = torch.float32 if name in "BC" and t.dim() == 2 else u.dtype
            assert t.dtype == wanted, (name, t.dtype)
            assert t.stride(-1) == 1, name
        assert D.dtype == torch.float32 and delta_bias.dtype == torch.float32
        seen["u_copied"] = u.data_ptr() != seen.get("u_ptr")
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    monkeypatch.setattr(mamba_cuda, "_import_interface", lambda: kernel)
    x = scan_inputs(seqlen=7, B_mode="constant")
    mixed = dict(x, delta=x["delta"].double(), z=x["z"].half(), D=x["D"].half())
    expected = selective_scan_reference(**x, delta_softplus=True)
    torch.testing.assert_close(
        mamba_cuda.selective_scan_cuda(**mixed, delta_softplus=True), expected, rtol=2e-3, atol=2e-3
    )
    # a (batch, dim, L) view of (batch, L, dim) memory has no unit stride along L: copied once
    seq_major = x["u"].transpose(1, 2).contiguous().transpose(1, 2)
    seen["u_ptr"] = seq_major.data_ptr()
    mamba_cuda.selective_scan_cuda(**dict(x, u=seq_major), delta_softplus=True)
    assert seen["u_copied"]
    seen["u_ptr"] = x["u"].data_ptr()  # already unit stride: passed as it is
    mamba_cuda.selective_scan_cuda(**x, delta_softplus=True)
    assert not seen["u_copied"]
