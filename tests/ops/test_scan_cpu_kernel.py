"""The fused C scan kernel (backend "cpu"): values against the reference loop, the dispatcher's
choice, its fallbacks, and the build's failure modes. Skipped where no C compiler works."""

from __future__ import annotations

import importlib

import pytest
import torch
from scan_inputs import record_backend_calls, scan_inputs

from esh.ops.selective_scan import (
    BackendUnavailableError,
    available_backends,
    selective_scan,
    selective_scan_reference,
)

cpu_kernel = importlib.import_module("esh.ops.selective_scan.cpu_kernel")
dispatch = importlib.import_module("esh.ops.selective_scan")  # the package, not the function

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason=f"no native kernel: {cpu_kernel.build_error()}")


def _rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _reference(x, **kw):
    x64 = {k: None if v is None else v.double() for k, v in x.items()}
    return selective_scan_reference(**x64, **kw)


def _seq_major(t):
    """The same values as a (batch, dim, L) view of (batch, L, dim) memory."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@needs_kernel
@pytest.mark.parametrize("seqlen", [1, 5, 197])
@pytest.mark.parametrize("dstate", [1, 16, 64])
@pytest.mark.parametrize("groups", [1, 2])
def test_matches_reference_values_and_last_state(seqlen, dstate, groups):
    x = scan_inputs(batch=3, dim=32 * groups, seqlen=seqlen, dstate=dstate, B_mode="grouped", groups=groups)
    with torch.no_grad():
        out, last = selective_scan(**x, delta_softplus=True, return_last_state=True, backend="cpu")
    ref, ref_last = _reference(x, delta_softplus=True, return_last_state=True)
    assert out.shape == ref.shape and last.shape == ref_last.shape
    assert _rel_err(out, ref) < 2e-5
    assert _rel_err(last, ref_last) < 2e-5


@needs_kernel
@pytest.mark.parametrize("with_D", [False, True])
@pytest.mark.parametrize("with_z", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("softplus", [False, True])
def test_optional_terms(with_D, with_z, with_bias, softplus):
    x = scan_inputs(dim=16, seqlen=40, with_D=with_D, with_z=with_z, with_bias=with_bias)
    with torch.no_grad():
        out = selective_scan(**x, delta_softplus=softplus, backend="cpu")
    assert _rel_err(out, _reference(x, delta_softplus=softplus)) < 2e-5


@needs_kernel
def test_sequence_major_inputs_give_sequence_major_output():
    x = scan_inputs(batch=2, dim=48, seqlen=30, dstate=8, with_z=False)
    xs = dict(x, u=_seq_major(x["u"]), delta=_seq_major(x["delta"]))
    with torch.no_grad():
        out_s = selective_scan(**xs, delta_softplus=True, backend="cpu")
        out_c = selective_scan(**x, delta_softplus=True, backend="cpu")
    assert out_c.is_contiguous()
    assert out_s.transpose(1, 2).is_contiguous() and not out_s.is_contiguous()
    torch.testing.assert_close(out_s, out_c, rtol=0, atol=0)
    assert _rel_err(out_s, _reference(x, delta_softplus=True)) < 2e-5


@needs_kernel
def test_extreme_steps_stay_finite_and_exact():
    # huge steps make the decays underflow and softplus take its linear branch
    x = scan_inputs(dim=16, seqlen=50, delta_scale=60.0, with_z=False)
    with torch.no_grad():
        out = selective_scan(**x, delta_softplus=True, backend="cpu")
    assert torch.isfinite(out).all()
    assert _rel_err(out, _reference(x, delta_softplus=True)) < 2e-5


@needs_kernel
def test_dispatcher_takes_the_kernel_for_inference_and_training(monkeypatch):
    calls = record_backend_calls(monkeypatch)
    x = scan_inputs(dim=16, seqlen=9)
    with torch.no_grad():
        selective_scan(**x)  # inference: the kernel
    x_grad = {k: None if v is None else v.clone().requires_grad_() for k, v in x.items()}
    selective_scan(**x_grad).sum().backward()  # gradients: the kernel's backward
    with torch.no_grad():
        selective_scan(**scan_inputs(dim=6, seqlen=9))  # 6 channels per group: not a multiple of 16
        selective_scan(**scan_inputs(dim=16, seqlen=9, B_mode="constant"))  # constant B
        selective_scan(**scan_inputs(dim=16, seqlen=9, dtype=torch.float64))
        selective_scan(**x, backend="chunked")  # asked for
    monkeypatch.setenv("ESH_CPU_KERNEL", "0")
    with torch.no_grad():
        selective_scan(**x)
    selective_scan(**x_grad).sum().backward()
    assert calls == ["cpu", "cpu", "chunked", "chunked", "chunked", "chunked", "chunked", "chunked"]
    assert "cpu" not in available_backends("cpu")


def _initial_state(x, dtype=torch.float32):
    (batch, dim, _), n = x["u"].shape, x["A"].shape[1]
    return torch.randn(batch, dim, n, generator=torch.Generator().manual_seed(3)).to(dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 2])
def test_initial_state_matches_reference(dtype, groups):
    # half-precision inputs with a float32 state: float32 arithmetic, the state taken as it is
    x = scan_inputs(batch=2, dim=32 * groups, seqlen=25, dstate=8, B_mode="grouped", groups=groups, dtype=dtype)
    h0 = _initial_state(x)
    with torch.no_grad():
        out, last = selective_scan(**x, delta_softplus=True, return_last_state=True, initial_state=h0, backend="cpu")
    ref, ref_last = _reference(x, delta_softplus=True, return_last_state=True, initial_state=h0.double())
    assert out.dtype == dtype and last.dtype == torch.float32
    assert _rel_err(out, ref) < (2e-5 if dtype == torch.float32 else 1e-2)
    assert _rel_err(last, ref_last) < 2e-5


@needs_kernel
def test_dispatcher_takes_the_kernel_with_an_initial_state_for_inference_and_training(monkeypatch):
    calls = record_backend_calls(monkeypatch)
    x = scan_inputs(dim=16, seqlen=9)
    h0 = _initial_state(x).requires_grad_()
    with torch.no_grad():
        selective_scan(**x, initial_state=h0)  # inference: the kernel
        selective_scan(**x, initial_state=h0.double())  # a float64 state: the chunked scan
    selective_scan(**x, initial_state=h0).sum().backward()  # the state needs a gradient: the kernel too
    assert calls == ["cpu", "chunked", "cpu"]
    assert h0.grad is not None and h0.grad.abs().sum() > 0
    grad = h0.grad.clone()
    h0.grad = None
    selective_scan(**x, initial_state=h0, backend="chunked").sum().backward()
    torch.testing.assert_close(grad, h0.grad, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_asking_for_the_kernel_where_it_cannot_run_is_a_clear_error():
    x = {k: None if v is None else v.clone().requires_grad_() for k, v in scan_inputs(dim=16, seqlen=5).items()}
    with pytest.raises(ValueError, match="backend 'cpu' cannot run these inputs: it needs input-dependent B and C"):
        selective_scan(**dict(x, B=x["A"].detach()), backend="cpu")
    with torch.no_grad(), pytest.raises(ValueError, match="multiple of 16 channels"):
        selective_scan(**scan_inputs(dim=6, seqlen=5), backend="cpu")


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setattr(cpu_kernel, "_tried", False)
    monkeypatch.setattr(cpu_kernel, "_build_error", None)
    monkeypatch.setenv("ESH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.delenv("ESH_CPU_KERNEL", raising=False)
    monkeypatch.delenv("ESH_SCAN_BACKEND", raising=False)
    x = scan_inputs(dim=16, seqlen=9)
    with pytest.warns(RuntimeWarning, match="native CPU scan kernel could not be built"), torch.no_grad():
        out = selective_scan(**x)
    assert _rel_err(out, _reference(x)) < 2e-5  # the chunked scan ran instead
    assert not cpu_kernel.available()
    assert "failed" in cpu_kernel.build_error()
    with pytest.raises(BackendUnavailableError, match="backend 'cpu' is unavailable"):
        selective_scan(**x, backend="cpu")
    assert not list(tmp_path.rglob("*.so"))  # nothing half-written left behind


def test_missing_compiler_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setattr(cpu_kernel, "_tried", False)
    monkeypatch.setattr(cpu_kernel, "_build_error", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert not cpu_kernel.available()
    assert "no C compiler" in cpu_kernel.build_error()


@needs_kernel
def test_build_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("ESH_CACHE_DIR", str(tmp_path))
    cc = cpu_kernel._compiler()
    first = cpu_kernel._build(cc, ["-O1"])
    mtime = first.stat().st_mtime_ns
    assert cpu_kernel._build(cc, ["-O1"]) == first and first.stat().st_mtime_ns == mtime  # reused
    assert cpu_kernel._build(cc, ["-O2"]) != first  # other flags, another library
    assert first.parent == tmp_path / "kernels"


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("ESH_CPU_KERNEL", "0")
    assert not cpu_kernel.available()
    with pytest.raises(BackendUnavailableError, match="ESH_CPU_KERNEL=0"):
        selective_scan(**scan_inputs(dim=16, seqlen=5), backend="cpu")


@needs_kernel
def test_vim_mixer_inference_matches_the_chunked_scan(monkeypatch):
    from esh.layers.bimamba import BiMambaMixer

    torch.manual_seed(0)
    mixer = BiMambaMixer(32).eval()
    h = torch.randn(2, 21, 32)
    with torch.no_grad():
        fast = mixer(h)
        monkeypatch.setenv("ESH_SCAN_BACKEND", "chunked")
        slow = mixer(h)
    assert _rel_err(fast, slow) < 1e-5


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_in_float32(dtype):
    x = scan_inputs(dim=16, seqlen=30, dtype=dtype)
    with torch.no_grad():
        out = selective_scan(**x, delta_softplus=True, backend="cpu")
        ref = selective_scan(**x, delta_softplus=True, backend="chunked")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


@needs_kernel
@pytest.mark.parametrize("divide_out", [True, False])
@pytest.mark.parametrize("segment", [1, 4, 9])
def test_vim_mixer_piecewise_inference_equals_the_whole_sequence(divide_out, segment):
    from esh.layers.bimamba import BiMambaMixer

    torch.manual_seed(0)
    mixer = BiMambaMixer(32, divide_out=divide_out).eval()
    for p in mixer.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)  # non-trivial projections and convolutions
    h = torch.randn(2, 37, 32)
    with torch.no_grad():
        mixer.segment_tokens = None
        whole = mixer(h)
        mixer.segment_tokens = segment
        calls = []
        original = mixer._forward_segmented
        mixer._forward_segmented = lambda *a: calls.append(a[1]) or original(*a)
        pieces = mixer(h)
    assert calls == [segment]  # 37 tokens > 2 x segment: the piecewise path ran
    assert _rel_err(pieces, whole) < 1e-5


@needs_kernel
def test_vim_mixer_piecewise_inference_goes_through_the_dispatcher_to_the_kernel(monkeypatch):
    from esh.layers.bimamba import BiMambaMixer

    monkeypatch.delenv("ESH_SCAN_BACKEND", raising=False)
    calls = []
    fn = dispatch._IMPLS["cpu"]
    monkeypatch.setitem(dispatch._IMPLS, "cpu", lambda *a, **k: calls.append("initial_state" in k) or fn(*a, **k))
    mixer = BiMambaMixer(32).eval()
    mixer.segment_tokens = 4
    with torch.no_grad():
        mixer(torch.randn(1, 10, 32))
    assert calls == [False, True, True] * 2  # 3 pieces per direction, the later ones from a state


@needs_kernel
def test_piecewise_inference_only_where_the_kernel_runs(monkeypatch):
    from esh.layers.bimamba import BiMambaMixer

    mixer = BiMambaMixer(32).eval()
    mixer.segment_tokens = 4
    h = torch.randn(1, 20, 32)
    with torch.no_grad():
        assert mixer._can_segment(h)
        assert not mixer._can_segment(h.double())
        monkeypatch.setenv("ESH_SCAN_BACKEND", "chunked")
        assert not mixer._can_segment(h)
    assert not mixer._can_segment(h)  # gradients recorded: the whole-sequence path
    monkeypatch.delenv("ESH_SCAN_BACKEND")
    out = mixer(h.requires_grad_())
    out.sum().backward()  # training never takes the piecewise path
    assert h.grad is not None


@needs_kernel
def test_vim_model_long_input_piecewise_equals_whole():
    import esh
    from esh.layers.bimamba import BiMambaMixer

    torch.manual_seed(0)
    model = esh.create_model("vim_tiny", img_size=96, depth=2).eval()  # 37 tokens
    x = torch.randn(1, 3, 96, 96)
    mixers = [m for m in model.modules() if isinstance(m, BiMambaMixer)]
    with torch.no_grad():
        whole = model(x)
        for m in mixers:
            m.segment_tokens = 8
        pieces = model(x)
    assert _rel_err(pieces, whole) < 1e-5
