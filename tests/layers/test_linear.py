"""esh.layers.linear: the C backward of the low-rank projection (dt_proj) against F.linear in
float64, where it applies and where it leaves F.linear alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from esh.layers.linear import _kernel, low_rank_linear
from esh.ops.selective_scan import cpu_kernel

pytestmark = pytest.mark.usefixtures("one_thread")
needs_kernel = pytest.mark.skipif(cpu_kernel.library() is None, reason="no native kernel")


def _strided(shape, rank, wide):
    """x (*shape, rank) as a view of wider rows (as dt is of x_proj's output), and a weight."""
    x = torch.randn(*shape, wide)[..., 1 : 1 + rank].requires_grad_()
    return x


@needs_kernel
@pytest.mark.parametrize("shape, rank, out, wide", [((3, 70), 8, 200, 40), ((130,), 1, 64, 5), ((2, 5), 16, 100, 20)])
def test_values_and_gradients_against_float64(shape, rank, out, wide):
    torch.manual_seed(0)
    x = _strided(shape, rank, wide)
    w = torch.randn(out, rank, requires_grad=True)
    assert _kernel(x, w) is not None
    y = low_rank_linear(x, w)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = F.linear(x64, w64)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), g.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-5, atol=1e-4)
    assert dx.shape == x.shape and dw.shape == w.shape


@needs_kernel
def test_one_input_needing_a_gradient():
    torch.manual_seed(1)
    x = torch.randn(9, 4)
    w = torch.randn(20, 4, requires_grad=True)
    (dw,) = torch.autograd.grad(low_rank_linear(x, w).sum(), (w,))
    torch.testing.assert_close(dw, torch.ones(9, 20).t() @ x)
    x.requires_grad_()
    w2 = w.detach()
    (dx,) = torch.autograd.grad(low_rank_linear(x, w2).sum(), (x,))
    torch.testing.assert_close(dx, torch.ones(9, 20) @ w2)


@needs_kernel
def test_gradients_are_the_same_bits_for_any_number_of_threads():
    torch.manual_seed(2)
    x = _strided((4, 150), 8, 40)
    w = torch.randn(256, 8, requires_grad=True)
    g = torch.randn(4, 150, 256)
    runs = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        runs.append(torch.autograd.grad(low_rank_linear(x, w), (x, w), g))
    torch.set_num_threads(1)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))


def test_where_it_is_f_linear(monkeypatch):
    torch.manual_seed(3)
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(32, 8, requires_grad=True)
    with torch.no_grad():  # inference: PyTorch's result bit for bit
        assert _kernel(x, w) is None
        assert torch.equal(low_rank_linear(x, w), F.linear(x, w))
    assert _kernel(x.double(), w.double()) is None
    assert _kernel(torch.randn(5, 80, requires_grad=True), torch.randn(32, 80)) is None  # rank above MAX_RANK
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _kernel(x, w) is None
        assert low_rank_linear(x, w).dtype == torch.bfloat16
    monkeypatch.setenv("ESH_CPU_KERNEL", "0")
    assert _kernel(x, w) is None
    assert torch.equal(low_rank_linear(x, w), F.linear(x, w))


@needs_kernel
def test_mamba_mixer_trains_through_it_with_f_linears_gradients(monkeypatch):
    import esh.layers.mamba as mamba

    torch.manual_seed(4)
    layer = mamba.Mamba(32, d_state=8)
    x = torch.randn(2, 20, 32)
    grads = []
    for impl in (low_rank_linear, F.linear):
        monkeypatch.setattr(mamba, "low_rank_linear", impl)
        layer.zero_grad()
        layer(x).square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
