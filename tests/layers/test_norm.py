"""esh.layers.norm: the fused CPU RMSNorm against torch.nn.RMSNorm in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esh.layers.norm import RMSNorm, fused_applies, rms_norm
from esh.ops.selective_scan import cpu_kernel

pytestmark = pytest.mark.usefixtures("one_thread")
needs_kernel = pytest.mark.skipif(cpu_kernel.library() is None, reason="no native kernel")


def _pair(dim, eps, affine):
    ours = RMSNorm(dim, eps=eps, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            ours.weight.normal_()
    ref = nn.RMSNorm(dim, eps=eps, elementwise_affine=affine).double()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 5, 40), (200, 128), (1, 1, 16), (130, 33)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-5, None])
def test_values_and_gradients_against_float64(shape, affine, eps):
    torch.manual_seed(0)
    ours, ref = _pair(shape[-1], eps, affine)
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape)
    assert fused_applies(x, ours.weight)
    y = ours(x)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64)
    y64.backward(g.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    if affine:
        torch.testing.assert_close(ours.weight.grad.double(), ref.weight.grad, rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # the inference path: the same kernel, nothing recorded
        assert torch.equal(ours(x), y.detach())


@needs_kernel
def test_weight_gradient_is_the_same_bits_for_any_number_of_threads():
    torch.manual_seed(1)
    ours, _ = _pair(96, 1e-5, True)
    x = torch.randn(3, 100, 96, requires_grad=True)
    g = torch.randn(3, 100, 96)
    runs = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        runs.append(torch.autograd.grad(ours(x), (x, ours.weight), g))
    torch.set_num_threads(1)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))


def test_state_dict_and_type_are_torchs():
    ours, ref = _pair(8, 1e-6, True)
    assert isinstance(ours, nn.RMSNorm)
    plain = nn.RMSNorm(8, eps=1e-6)
    plain.load_state_dict(ours.state_dict())
    assert torch.equal(plain.weight, ours.weight)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_and_kernel_off_are_torchs_forward(dtype, monkeypatch):
    torch.manual_seed(2)
    ours = RMSNorm(12).to(dtype)
    ref = nn.RMSNorm(12).to(dtype)
    x = torch.randn(4, 12, dtype=dtype)
    assert not fused_applies(x, ours.weight)
    assert torch.equal(ours(x), ref(x))
    monkeypatch.setenv("ESH_CPU_KERNEL", "0")
    x32, ours32, ref32 = x.float(), RMSNorm(12), nn.RMSNorm(12)
    assert not fused_applies(x32, ours32.weight)
    assert torch.equal(ours32(x32), ref32(x32))
    assert torch.equal(rms_norm(x32, (12,), None, None), nn.functional.rms_norm(x32, (12,), None, None))


@needs_kernel
def test_vim_rmsnorm_uses_the_kernel_and_keeps_its_formula():
    from esh.models.vim import RMSNorm as VimRMSNorm

    torch.manual_seed(3)
    norm = VimRMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(2, 9, 24)
    xf = x.double()
    want = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), want, rtol=1e-6, atol=1e-6)
    half = norm(x.bfloat16())  # other dtypes: the formula in float32, cast back
    assert half.dtype == torch.bfloat16
