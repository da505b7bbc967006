"""The C kernel's backward (backend "cpu" with gradients): all nine gradients (u, delta, A, B, C,
D, z, delta_bias, initial_state) against the float64 reference loop, checkpoint boundaries,
finite differences, determinism across runs and thread counts, and the fallbacks.

Tolerance: every gradient's largest error is below 1e-4 of its largest magnitude (float32
arithmetic against float64; measured errors are around 1e-7 to 1e-6), 2e-2 for bfloat16 and
float16 inputs (gradients rounded to their dtype)."""

from __future__ import annotations

import importlib

import pytest
import torch
from scan_inputs import record_backend_calls, run_with_grads, scan_inputs, with_grad

from esh.ops.selective_scan import selective_scan, selective_scan_reference

cpu_kernel = importlib.import_module("esh.ops.selective_scan.cpu_kernel")

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason=f"no native kernel: {cpu_kernel.build_error()}")
pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
K = 8  # checkpoint interval of the boundary tests


def _rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _with_state(x, seed=3):
    (batch, dim, _), n = x["u"].shape, x["A"].shape[1]
    g = torch.Generator().manual_seed(seed)
    return dict(x, initial_state=torch.randn(batch, dim, n, generator=g, dtype=torch.float64).to(x["u"].dtype))


def _kernel(checkpoint=None):
    def fn(**kw):
        return cpu_kernel.selective_scan_cpu(**kw, checkpoint_steps=checkpoint)

    return fn


def _check_against_reference(x, tol=TOL, checkpoint=None, **kw):
    out, last, grads = run_with_grads(_kernel(checkpoint), x, **kw)
    x64 = {k: None if v is None else v.double() for k, v in x.items()}
    ref_out, ref_last, ref_grads = run_with_grads(selective_scan_reference, x64, **kw)
    assert _rel_err(out, ref_out) < tol and _rel_err(last, ref_last) < tol
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g.shape == x[name].shape and g.dtype == x[name].dtype, name
        assert _rel_err(g, ref_grads[name]) < tol, (name, _rel_err(g, ref_grads[name]))
    return grads


@needs_kernel
@pytest.mark.parametrize("seqlen", [1, K - 1, K, K + 1, 2 * K, 197])
@pytest.mark.parametrize("dstate", [1, 16, 64])
@pytest.mark.parametrize("groups", [1, 2])
def test_all_gradients_match_the_reference_across_checkpoint_boundaries(seqlen, dstate, groups):
    x = scan_inputs(batch=2, dim=16 * groups, seqlen=seqlen, dstate=dstate, B_mode="grouped", C_mode="grouped")
    x = _with_state(dict(x, B=x["B"][:, :groups], C=x["C"][:, :groups]))
    _check_against_reference(x, checkpoint=K, delta_softplus=True)


@needs_kernel
@pytest.mark.parametrize("seqlen", [63, 64, 65, 1500])
def test_default_checkpoint_interval_and_a_long_sequence(seqlen):
    assert cpu_kernel.checkpoint_steps(4) == 64
    x = _with_state(scan_inputs(batch=1, dim=16, seqlen=seqlen, dstate=4))
    _check_against_reference(x, delta_softplus=True)


@needs_kernel
@pytest.mark.parametrize("with_D", [False, True])
@pytest.mark.parametrize("with_z", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("softplus", [False, True])
def test_optional_terms(with_D, with_z, with_bias, softplus):
    x = scan_inputs(dim=16, seqlen=20, with_D=with_D, with_z=with_z, with_bias=with_bias)
    _check_against_reference(x, checkpoint=K, delta_softplus=softplus)


@needs_kernel
def test_b_and_c_with_different_groups():
    # 2 groups of B and 3 of C over 96 channels: 6 groups of 16 channels see one B and one C each
    # (the forward used to read B with C's grouping, out of bounds)
    x = scan_inputs(batch=2, dim=96, seqlen=21, dstate=4, B_mode="grouped", C_mode="grouped", groups=6)
    x = _with_state(dict(x, B=x["B"][:, :2], C=x["C"][:, :3]))
    with torch.no_grad():
        out = selective_scan(**x, backend="cpu", delta_softplus=True)
    assert _rel_err(out, selective_scan_reference(**x, delta_softplus=True)) < 2e-5
    grads = _check_against_reference(x, checkpoint=K, delta_softplus=True)
    assert grads["B"].shape == (2, 2, 4, 21) and grads["C"].shape == (2, 3, 4, 21)


@needs_kernel
def test_variable_b_with_grouped_c():
    x = scan_inputs(batch=2, dim=32, seqlen=30, dstate=8, C_mode="grouped", groups=2)
    _check_against_reference(x, checkpoint=K, delta_softplus=True)


@needs_kernel
def test_underflowing_decays_and_the_linear_softplus_branch():
    # steps up to 60: exp(dt A) underflows to 0 and softplus(x > 20) = x
    x = _with_state(scan_inputs(dim=16, seqlen=40, delta_scale=60.0))
    grads = _check_against_reference(x, checkpoint=K, delta_softplus=True)
    assert all(torch.isfinite(g).all() for g in grads.values())


@needs_kernel
@pytest.mark.parametrize("layout", ["channel", "sequence"])
def test_the_forward_keeps_nothing_of_the_outputs_size_but_its_inputs(layout):
    # the backward recomputes y before the gate (C h + D u) from the chunk's states for dz, so
    # the forward saves its inputs (as views of the caller's tensors), A, B, C in the kernel's
    # forms and the checkpoints: no other tensor of size batch x dim x L
    x = with_grad(scan_inputs(batch=2, dim=32, seqlen=40, dstate=4))
    if layout == "sequence":
        x = {
            k: v.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
            if k in ("u", "delta", "z")
            else v
            for k, v in x.items()
        }
    out = _kernel(K)(**x, delta_softplus=True)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    big = {t.data_ptr() for t in saved if t.numel() >= out.numel()}
    assert big == {x[k].data_ptr() for k in ("u", "delta", "z")}
    # and the rest is small: the checkpoints are N / K of the output's size, B and C 2 N / dim
    assert sum(t.numel() for t in saved) <= 3 * out.numel() + out.numel() * 4 // K + 1000
    out.sum().backward()
    assert x["z"].grad is not None and torch.isfinite(x["z"].grad).all()


@needs_kernel
def test_sequence_major_inputs_get_sequence_major_gradients():
    def seq_major(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    x = scan_inputs(batch=2, dim=32, seqlen=30, dstate=8)
    xs = dict(x, u=seq_major(x["u"]), delta=seq_major(x["delta"]), z=seq_major(x["z"]))
    out_s, last_s, g_s = run_with_grads(_kernel(K), xs, delta_softplus=True)
    out_c, last_c, g_c = run_with_grads(_kernel(K), x, delta_softplus=True)
    assert out_s.transpose(1, 2).is_contiguous() and out_c.is_contiguous()
    for name in ("u", "delta", "z"):
        assert g_s[name].transpose(1, 2).is_contiguous() and not g_s[name].is_contiguous(), name
        assert g_c[name].is_contiguous(), name
    for name in g_c:
        torch.testing.assert_close(g_s[name], g_c[name], rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_get_gradients_in_their_dtype(dtype):
    x = _with_state(scan_inputs(dim=32, seqlen=25, dstate=8, dtype=dtype))
    x = dict(x, initial_state=x["initial_state"].float())  # a float32 state with half-precision inputs
    _, _, grads = run_with_grads(_kernel(K), x, delta_softplus=True)
    x32 = {k: None if v is None else v.float() for k, v in x.items()}
    _, _, ref = run_with_grads(_kernel(K), x32, delta_softplus=True)
    for name, g in grads.items():
        assert g.dtype == x[name].dtype, name
        assert _rel_err(g, ref[name]) < 2e-2, name


@needs_kernel
def test_gradient_of_the_last_state_alone_and_of_the_output_alone():
    x = with_grad(_with_state(scan_inputs(dim=16, seqlen=19, dstate=4)))
    x64 = with_grad({k: v.detach().double() for k, v in x.items()})
    _, last = cpu_kernel.selective_scan_cpu(**x, delta_softplus=True, return_last_state=True, checkpoint_steps=K)
    _, ref_last = selective_scan_reference(**x64, delta_softplus=True, return_last_state=True)
    last.square().sum().backward()
    ref_last.square().sum().backward()
    for name in ("u", "delta", "A", "B", "initial_state"):
        assert _rel_err(x[name].grad, x64[name].grad) < TOL, name
    assert x["C"].grad.abs().max() == 0 and x["D"].grad.abs().max() == 0  # the output was not used
    out = cpu_kernel.selective_scan_cpu(**with_grad(x), delta_softplus=True)  # no last state returned
    out.sum().backward()


@needs_kernel
def test_finite_differences_on_a_tiny_case():
    """Directional derivatives of the kernel's own float32 forward against its backward."""
    x = _with_state(scan_inputs(batch=1, dim=16, seqlen=6, dstate=3, seed=5))
    x = {k: v.double() for k, v in x.items()}  # perturbed in float64, rounded to float32 per call
    g = torch.Generator().manual_seed(7)
    w = torch.randn(1, 16, 6, generator=g, dtype=torch.float64)

    def loss(inputs):
        f32 = {k: v.float() for k, v in inputs.items()}
        out, last = cpu_kernel.selective_scan_cpu(**f32, delta_softplus=True, return_last_state=True)
        return (out.double() * w).sum() + last.double().sum()

    leaves = {k: v.float().requires_grad_() for k, v in x.items()}
    out, last = cpu_kernel.selective_scan_cpu(**leaves, delta_softplus=True, return_last_state=True, checkpoint_steps=4)
    ((out.double() * w).sum() + last.double().sum()).backward()
    eps = 1e-2
    for name, v in x.items():
        direction = torch.randn(v.shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            plus = loss(dict(x, **{name: v + eps * direction}))
            minus = loss(dict(x, **{name: v - eps * direction}))
        numeric = float((plus - minus) / (2 * eps))
        analytic = float((leaves[name].grad.double() * direction).sum())
        assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(numeric)), (name, numeric, analytic)


@needs_kernel
def test_gradients_are_the_same_bits_across_runs_and_thread_counts():
    # 4 blocks of 16 channels per group and 3 sequences: partial sums over blocks and the batch
    x = _with_state(scan_inputs(batch=3, dim=128, seqlen=70, dstate=8, B_mode="grouped", groups=2))
    runs = []
    for threads in (1, 2, 3, 1):
        torch.set_num_threads(threads)
        try:
            runs.append(run_with_grads(_kernel(16), x, delta_softplus=True)[2])
        finally:
            torch.set_num_threads(1)
    for other in runs[1:]:
        for name, g in runs[0].items():
            assert torch.equal(g, other[name]), name


@needs_kernel
def test_training_through_the_dispatcher_matches_the_chunked_scan(monkeypatch):
    from esh.layers.bimamba import BiMambaMixer

    calls = record_backend_calls(monkeypatch)
    torch.manual_seed(0)
    mixer = BiMambaMixer(32)
    h = torch.randn(2, 21, 32)

    def grads():
        mixer.zero_grad()
        mixer(h).square().sum().backward()
        return {k: p.grad.clone() for k, p in mixer.named_parameters()}

    fast = grads()
    assert calls == ["cpu"]  # both directions in one call
    monkeypatch.setenv("ESH_CPU_KERNEL", "0")
    slow = grads()
    assert calls == ["cpu", "chunked"]
    for k in fast:
        assert _rel_err(fast[k], slow[k]) < 1e-4, k


def test_without_a_compiler_training_falls_back_to_the_chunked_scan(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernel, "_lib", None)
    monkeypatch.setattr(cpu_kernel, "_tried", False)
    monkeypatch.setattr(cpu_kernel, "_build_error", None)
    monkeypatch.setenv("ESH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    calls = record_backend_calls(monkeypatch, ("chunked",))
    x = _with_state(scan_inputs(dim=16, seqlen=12))
    _, _, grads = run_with_grads(selective_scan, x, delta_softplus=True)
    x64 = {k: v.double() for k, v in x.items()}
    _, _, ref = run_with_grads(selective_scan_reference, x64, delta_softplus=True)
    assert calls == ["chunked"] and not cpu_kernel.available()
    assert "no C compiler" in cpu_kernel.build_error()
    for name in ref:
        assert _rel_err(grads[name], ref[name]) < TOL, name
