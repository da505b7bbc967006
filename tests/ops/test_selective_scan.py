"""The fast selective scan equals the reference loop in values and gradients."""

from __future__ import annotations

import importlib

import pytest
import torch
from scan_inputs import run_with_grads, scan_inputs, with_grad

from esh.ops import BackendUnavailableError, selective_scan, selective_scan_reference
from esh.ops.selective_scan import available_backends, chunked, resolve_backend
from esh.ops.selective_scan.chunked import selective_scan_chunked


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_scan_matches(x, rtol, chunk_size=None, **kwargs):
    """Fast path vs reference: output, last state and every gradient, relative to max |ref|."""
    out_r, last_r, grads_r = run_with_grads(selective_scan_reference, x, **kwargs)
    out_f, last_f, grads_f = run_with_grads(selective_scan_chunked, x, chunk_size=chunk_size, **kwargs)
    assert out_f.dtype == out_r.dtype == x["u"].dtype
    assert out_f.shape == out_r.shape
    assert last_f.shape == last_r.shape == (x["u"].shape[0], x["u"].shape[1], x["A"].shape[1])
    assert _rel_err(out_f, out_r) <= rtol, "output"
    assert _rel_err(last_f, last_r) <= rtol, "last state"
    assert grads_f.keys() == grads_r.keys()
    for name in grads_r:
        assert grads_f[name].shape == grads_r[name].shape, name
        assert grads_f[name].dtype == x[name].dtype, name
        assert _rel_err(grads_f[name], grads_r[name]) <= rtol, f"grad of {name}"


# float32 vs float32: the two sum in different orders; 2e-5 of the largest value covers
# that over 1500 steps. float64 shows the algebra is exact (1e-10).
@pytest.mark.parametrize("seqlen", [1, 7, 64, 197, 1500])
@pytest.mark.parametrize("dstate", [1, 8, 16])
def test_matches_reference_over_lengths_and_state_sizes(seqlen, dstate):
    x = scan_inputs(batch=2, dim=4, seqlen=seqlen, dstate=dstate)
    assert_scan_matches(x, rtol=2e-5, delta_softplus=True)


@pytest.mark.parametrize("seqlen", [1, 7, 64, 197])
def test_matches_reference_in_float64(seqlen):
    x = scan_inputs(seqlen=seqlen, dtype=torch.float64)
    assert_scan_matches(x, rtol=1e-10, delta_softplus=True)


@pytest.mark.parametrize("with_D", [False, True])
@pytest.mark.parametrize("with_z", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("softplus", [False, True])
def test_matches_reference_with_and_without_optional_terms(with_D, with_z, with_bias, softplus):
    x = scan_inputs(seqlen=50, with_D=with_D, with_z=with_z, with_bias=with_bias, dtype=torch.float64)
    if not softplus:
        x["delta"] = x["delta"].abs()  # without softplus the step must already be positive
    assert_scan_matches(x, rtol=1e-10, delta_softplus=softplus)


@pytest.mark.parametrize(
    "B_mode,C_mode",
    [
        ("constant", "constant"),
        ("constant", "variable"),
        ("variable", "constant"),
        ("variable", "variable"),
        ("grouped", "grouped"),
        ("grouped", "variable"),
        ("constant", "grouped"),
    ],
)
def test_matches_reference_for_constant_variable_and_grouped_B_C(B_mode, C_mode):
    x = scan_inputs(dim=6, seqlen=40, B_mode=B_mode, C_mode=C_mode, groups=3, dtype=torch.float64)
    assert_scan_matches(x, rtol=1e-10, delta_softplus=True)


def test_B_and_C_with_different_group_counts():
    x = scan_inputs(dim=6, seqlen=20, B_mode="grouped", C_mode="grouped", groups=2, dtype=torch.float64)
    x["C"] = torch.randn(2, 3, 4, 20, dtype=torch.float64)
    assert_scan_matches(x, rtol=1e-10, delta_softplus=True)


@pytest.mark.parametrize("chunk", [1, 2, 5, 16, 63, 64, 200])
def test_every_chunk_size_gives_the_same_result(chunk):
    x = scan_inputs(seqlen=64, dtype=torch.float64)
    out_r, last_r, grads_r = run_with_grads(selective_scan_reference, x, delta_softplus=True)
    out_f, last_f, grads_f = run_with_grads(selective_scan_chunked, x, delta_softplus=True, chunk_size=chunk)
    assert _rel_err(out_f, out_r) < 1e-12
    assert _rel_err(last_f, last_r) < 1e-12
    for name in grads_r:
        assert _rel_err(grads_f[name], grads_r[name]) < 1e-11, name


# bfloat16 inputs: both paths compute in float32 from the same inputs and round the output
# to bfloat16, so they agree to a couple of bfloat16 ulps (2**-8 relative).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_compute_in_float32(dtype):
    x = scan_inputs(seqlen=197, dstate=8, dtype=dtype)
    out_r, last_r, grads_r = run_with_grads(selective_scan_reference, x, delta_softplus=True)
    out_f, last_f, grads_f = run_with_grads(selective_scan_chunked, x, delta_softplus=True)
    assert out_f.dtype == dtype and last_f.dtype == torch.float32
    assert _rel_err(out_f, out_r) <= 1e-2
    assert _rel_err(last_f, last_r) <= 1e-5  # float32 state from identical inputs
    for name in grads_r:
        assert grads_f[name].dtype == dtype
        assert _rel_err(grads_f[name], grads_r[name]) <= 2e-2, name
    # and the float32 arithmetic is really used: same as the float32 scan of the same values
    x32 = {k: None if v is None else v.float() for k, v in x.items()}
    out32 = selective_scan_chunked(**x32, delta_softplus=True)
    assert _rel_err(out_f.float(), out32) <= 2**-8


def test_gradcheck_float64():
    x = with_grad(scan_inputs(batch=1, dim=2, seqlen=6, dstate=3, groups=2, B_mode="grouped", dtype=torch.float64))
    names = list(x)

    def fn(*args):
        out, last = selective_scan_chunked(
            **dict(zip(names, args)), delta_softplus=True, return_last_state=True, chunk_size=4
        )
        return out, last

    assert torch.autograd.gradcheck(fn, tuple(x[k] for k in names))


def test_long_sequence_with_large_steps_stays_finite_and_exact():
    # steps up to ~20 with A down to -16: exp(dt*A) underflows to 0 and exp-of-cumsum
    # formulations overflow; the sequential form must not.
    x = scan_inputs(batch=1, dim=4, seqlen=4096, dstate=16, with_z=False, dtype=torch.float64, delta_scale=20.0)
    x["A"] = -torch.linspace(0.01, 16, 4 * 16, dtype=torch.float64).view(4, 16)
    x32 = {k: None if v is None else v.float() for k, v in x.items()}
    out64, last64 = selective_scan_reference(**x, delta_softplus=True, return_last_state=True)
    out, last = selective_scan(**x32, delta_softplus=True, return_last_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert _rel_err(out, out64) < 1e-5
    assert _rel_err(last, last64) < 1e-5
    # gradients stay finite too
    xg = with_grad(x32)
    selective_scan(**xg, delta_softplus=True).sum().backward()
    assert all(torch.isfinite(v.grad).all() for v in xg.values() if v is not None)


def test_dispatcher_default_on_cpu_is_the_fast_path(monkeypatch):
    monkeypatch.delenv("ESH_SCAN_BACKEND", raising=False)
    assert resolve_backend(None, "cpu") == "chunked"


def test_backend_argument_and_environment_variable_force_a_backend(monkeypatch):
    calls = []
    impls = dict(chunked=selective_scan_chunked, reference=selective_scan_reference)
    dispatch = importlib.import_module("esh.ops.selective_scan")  # the package, not the function

    for name, fn in impls.items():
        monkeypatch.setitem(dispatch._IMPLS, name, lambda *a, _n=name, _f=fn: calls.append(_n) or _f(*a))
    x = scan_inputs(seqlen=5)
    selective_scan(**x, backend="reference")
    monkeypatch.setenv("ESH_SCAN_BACKEND", "reference")
    selective_scan(**x)
    selective_scan(**x, backend="chunked")  # the argument wins over the variable
    monkeypatch.delenv("ESH_SCAN_BACKEND")
    selective_scan(**x)
    assert calls == ["reference", "reference", "chunked", "chunked"]


def test_unknown_backend_is_a_clear_error(monkeypatch):
    x = scan_inputs(seqlen=5)
    with pytest.raises(ValueError, match="unknown backend 'triton-fast'.*expected one of"):
        selective_scan(**x, backend="triton-fast")
    monkeypatch.setenv("ESH_SCAN_BACKEND", "nope")
    with pytest.raises(ValueError, match="ESH_SCAN_BACKEND"):
        selective_scan(**x)


def test_cuda_backend_unavailable_is_a_clear_error():
    x = scan_inputs(seqlen=5)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        selective_scan(**x, backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_path_runs_on_cuda():
    x = {k: None if v is None else v.cuda() for k, v in scan_inputs(seqlen=100).items()}
    out = selective_scan_chunked(**x, delta_softplus=True)
    ref = selective_scan_reference(**x, delta_softplus=True)
    assert _rel_err(out, ref) < 1e-5


def test_no_grad_forward_saves_nothing_and_matches():
    x = scan_inputs(seqlen=70)
    with torch.no_grad():
        out = selective_scan(**x, delta_softplus=True)
    assert not out.requires_grad
    assert _rel_err(out, selective_scan_reference(**x, delta_softplus=True)) < 2e-5


def test_default_chunk_keeps_the_working_set_small():
    # (batch, dim, N) = (4, 1024, 16) is 256 KiB per step: a chunk holds 4 MiB, 16 steps, not L
    assert chunked.default_chunk_size(4, 1024, 16, 1024) == 16
    assert chunked.default_chunk_size(1, 4, 1, 5) == 5


def test_non_contiguous_inputs_give_the_same_result():
    # Mamba modules hand the scan transposed projections: (batch, L, dim) viewed as (batch, dim, L)
    x = scan_inputs(seqlen=30, dtype=torch.float64)
    strided = {
        k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if v is not None and v.dim() > 1 else v
        for k, v in x.items()
    }
    assert not strided["u"].is_contiguous()
    out_r, last_r, grads_r = run_with_grads(selective_scan_reference, x, delta_softplus=True)
    out_f, last_f, grads_f = run_with_grads(selective_scan_chunked, strided, delta_softplus=True)
    assert _rel_err(out_f, out_r) < 1e-12 and _rel_err(last_f, last_r) < 1e-12
    for name in grads_r:
        assert _rel_err(grads_f[name], grads_r[name]) < 1e-11, name


def test_reused_workspace_gives_identical_results_across_calls():
    big = scan_inputs(batch=2, dim=8, seqlen=100, dstate=8)
    small = scan_inputs(batch=1, dim=4, seqlen=9, dstate=2)
    first = selective_scan_chunked(**big, delta_softplus=True)
    selective_scan_chunked(**small, delta_softplus=True)
    chunked.release_workspace()
    again = selective_scan_chunked(**big, delta_softplus=True)
    assert torch.equal(first, again)


def test_workspace_survives_switching_in_and_out_of_inference_mode():
    x = scan_inputs(seqlen=40)
    with torch.inference_mode():
        inside = selective_scan_chunked(**x, delta_softplus=True)
    outside = selective_scan_chunked(**x, delta_softplus=True)
    torch.testing.assert_close(inside, outside)
    with torch.inference_mode():
        torch.testing.assert_close(selective_scan_chunked(**x, delta_softplus=True), outside)


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1024, 1025)])
def test_layout_transpose_both_paths(shape):
    x = torch.randn(*shape)
    out = chunked._swap_last2(x)
    assert out.is_contiguous() and torch.equal(out, x.transpose(1, 2))


@pytest.mark.parametrize("with_z,with_bias", [(True, True), (False, False)])
def test_sequence_major_inputs_need_no_transpose_and_give_the_same_values_and_gradients(with_z, with_bias):
    # (batch, dim, L) views of contiguous (batch, L, dim) tensors, as models with (batch, L, C)
    # activations pass them: the output comes back in that layout, values and all eight
    # gradients equal those of the same inputs stored channel-major
    g = torch.Generator().manual_seed(5)
    b, d, L, n = 2, 12, 37, 4

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    u, dl, z, Bs, Cs = rnd(b, L, d), 0.5 * rnd(b, L, d), rnd(b, L, d), rnd(b, L, 2, n), rnd(b, L, 2, n)
    A, D, bias = -torch.rand(d, n, generator=g, dtype=torch.float64) - 0.1, rnd(d), 0.1 * rnd(d)
    w = torch.sin(torch.arange(b * d * L, dtype=torch.float64)).view(b, d, L)

    def run(seq_major: bool):
        leaves = [t.clone().requires_grad_() for t in (u, dl, z, Bs, Cs, A, D, bias)]
        uu, dd, zz, BB, CC, AA, DD, bb = leaves
        lay = (lambda t: t) if seq_major else (lambda t: t.contiguous())
        out, last = selective_scan_chunked(
            lay(uu.transpose(1, 2)),
            lay(dd.transpose(1, 2)),
            AA,
            lay(BB.permute(0, 2, 3, 1)),
            lay(CC.permute(0, 2, 3, 1)),
            DD,
            z=lay(zz.transpose(1, 2)) if with_z else None,
            delta_bias=bb if with_bias else None,
            delta_softplus=True,
            return_last_state=True,
        )
        used = [t for t, keep in zip(leaves, (1, 1, with_z, 1, 1, 1, 1, with_bias)) if keep]
        return out, last, torch.autograd.grad((out * w).sum() + last.sum(), used)

    out, last, grads = run(True)
    ref_out, ref_last, ref_grads = run(False)
    assert out.transpose(1, 2).is_contiguous()  # sequence-major in, sequence-major out
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, ref_last, rtol=1e-12, atol=1e-12)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    expected = selective_scan_reference(
        u.transpose(1, 2),
        dl.transpose(1, 2),
        A,
        Bs.permute(0, 2, 3, 1),
        Cs.permute(0, 2, 3, 1),
        D,
        z=z.transpose(1, 2) if with_z else None,
        delta_bias=bias if with_bias else None,
        delta_softplus=True,
    )
    torch.testing.assert_close(out.detach(), expected, rtol=1e-10, atol=1e-10)


def test_mixed_layouts_give_the_same_result():
    # u channel-major with delta sequence-major (and the reverse): no buffer may alias another
    x = scan_inputs(2, 6, 29, 4, B_mode="variable", C_mode="variable", dtype=torch.float64, seed=3)
    ref = selective_scan_chunked(**x, delta_softplus=True)
    for name in ("delta", "u"):
        y = dict(x)
        y[name] = x[name].transpose(1, 2).contiguous().transpose(1, 2)
        torch.testing.assert_close(selective_scan_chunked(**y, delta_softplus=True), ref, rtol=1e-12, atol=1e-12)


def with_initial_state(x, dtype=None, seed=7):
    """x plus a random (batch, dim, N) initial state, in u's dtype unless ``dtype`` is given."""
    (batch, dim, _), n = x["u"].shape, x["A"].shape[1]
    g = torch.Generator().manual_seed(seed)
    h0 = torch.randn(batch, dim, n, generator=g, dtype=torch.float64).to(dtype or x["u"].dtype)
    return dict(x, initial_state=h0)


def time_slice(x, t0, t1):
    """Steps t0..t1-1 of every per-step input (u, delta, z and input-dependent B, C)."""
    return {k: v[..., t0:t1] if v is not None and v.dim() >= 3 else v for k, v in x.items()}


@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
@pytest.mark.parametrize("split", [1, 17, 39])
def test_initial_state_continues_a_split_sequence(backend, split):
    # scan(x1 ++ x2) == scan(x1) ++ scan(x2 from the last state of x1), on every backend
    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is unavailable here")
    x = scan_inputs(batch=2, dim=16, seqlen=40, dstate=8)
    with torch.no_grad():
        whole, last = selective_scan(**x, delta_softplus=True, return_last_state=True, backend=backend)
        out1, h1 = selective_scan(
            **time_slice(x, 0, split), delta_softplus=True, return_last_state=True, backend=backend
        )
        out2, h2 = selective_scan(
            **time_slice(x, split, 40), delta_softplus=True, return_last_state=True, backend=backend, initial_state=h1
        )
    assert _rel_err(torch.cat([out1, out2], -1), whole) < 1e-6
    assert _rel_err(h2, last) < 1e-6


def test_initial_state_enters_as_the_state_before_the_first_step():
    # one step: h[0] = exp(dt A) h_init + dt B u, y[0] = C h[0] (no D, no gate)
    x = scan_inputs(batch=1, dim=3, seqlen=1, dstate=2, with_D=False, with_z=False, with_bias=False)
    x = with_initial_state(x, dtype=torch.float32)
    dt = x["delta"][..., 0, None]
    h = torch.exp(dt * x["A"]) * x["initial_state"] + dt * x["B"][:, None, :, 0] * x["u"][..., 0, None]
    for backend in ("reference", "chunked"):
        out, last = selective_scan(**x, return_last_state=True, backend=backend)
        torch.testing.assert_close(last, h)
        torch.testing.assert_close(out[..., 0], (h * x["C"][:, None, :, 0]).sum(-1))


@pytest.mark.parametrize("impl", [selective_scan_reference, selective_scan_chunked], ids=["reference", "chunked"])
def test_gradcheck_float64_with_initial_state(impl):
    x = scan_inputs(batch=1, dim=2, seqlen=6, dstate=3, groups=2, B_mode="grouped", dtype=torch.float64)
    x = with_grad(with_initial_state(x))
    names = list(x)
    kwargs = {"chunk_size": 4} if impl is selective_scan_chunked else {}

    def fn(*args):
        return impl(**dict(zip(names, args)), delta_softplus=True, return_last_state=True, **kwargs)

    assert torch.autograd.gradcheck(fn, tuple(x[k] for k in names))


@pytest.mark.parametrize(
    "B_mode,C_mode",
    [("constant", "constant"), ("variable", "variable"), ("grouped", "variable"), ("constant", "grouped")],
)
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_initial_state_gradients_match_reference(B_mode, C_mode, chunk):
    x = scan_inputs(dim=6, seqlen=23, B_mode=B_mode, C_mode=C_mode, groups=3, dtype=torch.float64)
    assert_scan_matches(with_initial_state(x), rtol=1e-10, delta_softplus=True, chunk_size=chunk)


@pytest.mark.parametrize("with_z,with_D,softplus", [(False, False, False), (True, True, True)])
def test_initial_state_gradients_match_reference_with_and_without_optional_terms(with_z, with_D, softplus):
    x = scan_inputs(seqlen=30, with_z=with_z, with_D=with_D, with_bias=softplus, dtype=torch.float64)
    assert_scan_matches(with_initial_state(x), rtol=1e-10, delta_softplus=softplus)


def test_initial_state_gradients_match_reference_for_sequence_major_inputs():
    x = with_initial_state(scan_inputs(dim=8, seqlen=31, B_mode="grouped", groups=2, dtype=torch.float64))
    # (batch, dim, L) views of (batch, L, dim) memory, and a transposed (batch, N, dim) state
    strided = {
        k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if v is not None and v.dim() > 1 else v
        for k, v in x.items()
    }
    out_r, last_r, grads_r = run_with_grads(selective_scan_reference, x, delta_softplus=True)
    out_f, last_f, grads_f = run_with_grads(selective_scan_chunked, strided, delta_softplus=True, chunk_size=8)
    assert _rel_err(out_f, out_r) < 1e-12 and _rel_err(last_f, last_r) < 1e-12
    assert grads_f.keys() == grads_r.keys() and "initial_state" in grads_f
    for name in grads_r:
        assert _rel_err(grads_f[name], grads_r[name]) < 1e-11, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_with_a_float32_initial_state(dtype):
    x = with_initial_state(scan_inputs(seqlen=50, dstate=8, dtype=dtype), dtype=torch.float32)
    out_r, last_r, grads_r = run_with_grads(selective_scan_reference, x, delta_softplus=True)
    out_f, last_f, grads_f = run_with_grads(selective_scan_chunked, x, delta_softplus=True)
    assert out_f.dtype == dtype and last_f.dtype == torch.float32
    assert grads_f["initial_state"].dtype == torch.float32 and grads_f["u"].dtype == dtype
    assert _rel_err(out_f, out_r) <= 1e-2
    assert _rel_err(last_f, last_r) <= 1e-5
    assert _rel_err(grads_f["initial_state"], grads_r["initial_state"]) <= 1e-5  # float32 both ways
    for name in grads_r:
        assert _rel_err(grads_f[name], grads_r[name]) <= 2e-2, name


def test_no_initial_state_and_a_zero_one_give_the_same_values_and_gradients():
    x = scan_inputs(seqlen=40, dtype=torch.float64)
    zero = dict(x, initial_state=torch.zeros(2, 6, 4, dtype=torch.float64))
    out, last, grads = run_with_grads(selective_scan_chunked, x, delta_softplus=True, chunk_size=16)
    out0, last0, grads0 = run_with_grads(selective_scan_chunked, zero, delta_softplus=True, chunk_size=16)
    assert torch.equal(out, out0) and torch.equal(last, last0)
    for name in grads:
        assert torch.equal(grads[name], grads0[name]), name


def test_default_dispatch_leaves_the_cuda_backend_when_there_is_an_initial_state(monkeypatch):
    # mamba_ssm's kernel takes no initial state: where "cuda" would be the default, such calls go
    # to another backend; asking for "cuda" with one is an error (before mamba_ssm is imported)
    dispatch = importlib.import_module("esh.ops.selective_scan")
    calls = []
    monkeypatch.setitem(
        dispatch._IMPLS, "chunked", lambda *a, **k: calls.append("chunked") or selective_scan_chunked(*a, **k)
    )
    monkeypatch.setitem(dispatch._IMPLS, "cuda", lambda *a, **k: calls.append("cuda") or selective_scan_chunked(*a))
    monkeypatch.setattr(dispatch, "_resolve", lambda backend, device_type: ("cuda", False))
    x = with_grad(scan_inputs(seqlen=5))
    selective_scan(**x)
    selective_scan(**with_initial_state(x))
    assert calls == ["cuda", "chunked"]
    monkeypatch.setattr(dispatch, "_resolve", lambda backend, device_type: ("cuda", True))
    with pytest.raises(ValueError, match="backend 'cuda' cannot run these inputs: .*no initial_state"):
        selective_scan(**with_initial_state(x), backend="cuda")


@pytest.mark.parametrize("fn", [selective_scan_chunked, selective_scan_reference], ids=["chunked", "reference"])
@pytest.mark.parametrize("C_mode", ["variable", "constant"])
def test_autocast_leaves_the_scan_in_float32(fn, C_mode):
    # under autocast the chunked scan's contractions (bmm) would run in bfloat16 (~3e-3 error)
    x = scan_inputs(C_mode=C_mode, B_mode=C_mode)
    exact, _, exact_grads = run_with_grads(fn, {k: None if v is None else v.double() for k, v in x.items()})
    plain, _, plain_grads = run_with_grads(fn, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, grads = run_with_grads(fn, x)
    assert out.dtype == torch.float32
    assert torch.equal(out, plain)  # autocast changes nothing
    assert (out.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    for name, grad in grads.items():
        assert grad.dtype == x[name].dtype
        assert torch.equal(grad, plain_grads[name]), name
        assert (grad.double() - exact_grads[name]).abs().max() <= 1e-5 * exact_grads[name].abs().max(), name
