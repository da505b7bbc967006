"""depthwise_conv: the sequence-major depthwise conv of the Mamba mixers against F.conv1d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from esh.layers.conv import depthwise_conv

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv1d(x, w, b, left):
    """The same conv through F.conv1d in its (batch, channels, L) layout."""
    k = w.shape[1]
    xc = F.pad(x.transpose(1, 2), (left, k - 1 - left))
    return F.conv1d(xc, w.unsqueeze(1), b, groups=w.shape[0]).transpose(1, 2)


def _shifted(x, w, b):
    """The causal conv as autograd-recorded shifted multiply-adds (the mixers' previous form)."""
    k = w.shape[1]
    out = torch.addcmul(b, x, w[:, k - 1])
    for j in range(1, min(k, x.shape[1])):
        out[:, j:].addcmul_(x[:, :-j], w[:, k - 1 - j])
    return out


@pytest.mark.parametrize("k,left", [(4, 3), (3, 2), (3, 1), (4, 1), (2, 0)])
@pytest.mark.parametrize("seqlen", [1, 2, 3, 9])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_conv1d(k, left, seqlen, bias):
    torch.manual_seed(0)
    xz = torch.randn(2, seqlen, 12, dtype=torch.float64)
    x = xz[..., :6].detach().requires_grad_()  # a non-contiguous view, as in_proj's chunk gives
    w = torch.randn(6, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True) if bias else None
    g = torch.randn(2, seqlen, 6, dtype=torch.float64)
    got = depthwise_conv(x, w, b, left)
    grads = torch.autograd.grad(got, [x, w] + ([b] if bias else []), g)
    want = _conv1d(x, w, b, left)
    expected = torch.autograd.grad(want, [x, w] + ([b] if bias else []), g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: depthwise_conv(x, w, b, 2), (x, w, b))


def test_forward_is_bit_identical_to_the_shifted_form_and_gradients_match_it(monkeypatch):
    monkeypatch.setenv("ESH_CPU_KERNEL", "0")  # the PyTorch form (the C kernel: tests below)
    torch.manual_seed(2)
    x = torch.randn(3, 17, 40, requires_grad=True)
    w = torch.randn(40, 4, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    g = torch.randn(3, 17, 40)
    new = depthwise_conv(x, w, b)
    old = _shifted(x, w, b)
    assert torch.equal(new, old)
    with torch.no_grad():
        assert torch.equal(depthwise_conv(x, w, b), old)
    for a, e in zip(torch.autograd.grad(new, (x, w, b), g), torch.autograd.grad(old, (x, w, b), g), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_out_is_written_for_inference_and_refused_under_autograd():
    x, w, b = torch.randn(2, 6, 4), torch.randn(4, 3), torch.randn(4)
    buf = torch.empty(2, 6, 8)
    got = depthwise_conv(x, w, b, out=buf[..., 4:])
    assert got.data_ptr() == buf[..., 4:].data_ptr()
    torch.testing.assert_close(buf[..., 4:], _conv1d(x, w, b, 2))
    with pytest.raises(RuntimeError, match="out="):
        depthwise_conv(x, w.requires_grad_(), b, out=buf[..., :4])


def test_half_precision_input_gives_the_weights_dtype_and_its_own_gradient_dtype():
    x = torch.randn(2, 6, 4, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 3, requires_grad=True)
    out = depthwise_conv(x, w)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


# The fused C convolution (conv_cpu.c): float32 CPU tensors whose channels are contiguous.
cpu_kernel = pytest.importorskip("esh.ops.selective_scan.cpu_kernel")
needs_kernel = pytest.mark.skipif(cpu_kernel.library() is None, reason="no native kernel")


def _reference(x, w, b, left, activation):
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    y = _conv1d(x64, w64, b64, left)
    return (F.silu(y) if activation else y), [t for t in (x64, w64, b64) if t is not None]


@needs_kernel
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("k,left,seqlen", [(4, 3, 1), (4, 3, 9), (4, 3, 130), (3, 1, 70), (2, 0, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_values_and_gradients_against_float64_conv1d(activation, k, left, seqlen, bias):
    torch.manual_seed(3)
    xz = torch.randn(2, seqlen, 2 * 80)
    x = xz[..., :80].detach().requires_grad_()  # in_proj's chunk: a step stride of 160
    w = torch.randn(80, k, requires_grad=True)
    b = torch.randn(80, requires_grad=True) if bias else None
    g = torch.randn(2, seqlen, 80)
    got = depthwise_conv(x, w, b, left, activation=activation)
    assert got.is_contiguous() and got.dtype == torch.float32
    want, leaves = _reference(x, w, b, left, activation)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    inputs = [t for t in (x, w, b) if t is not None]
    for a, e in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, leaves, g.double()), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_kernel_gradients_are_the_same_bits_for_any_number_of_threads():
    torch.manual_seed(4)
    x = torch.randn(3, 200, 48, requires_grad=True)
    w = torch.randn(48, 4, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    g = torch.randn(3, 200, 48)
    runs = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        runs.append(torch.autograd.grad(depthwise_conv(x, w, b, activation="silu"), (x, w, b), g))
    torch.set_num_threads(1)
    for other in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(runs[0], other, strict=True))


@needs_kernel
def test_kernel_writes_out_slices_and_matches_the_pytorch_form(monkeypatch):
    torch.manual_seed(5)
    x, w, b = torch.randn(2, 11, 32), torch.randn(32, 4), torch.randn(32)
    buf = torch.zeros(2, 11, 64)
    got = depthwise_conv(x, w, b, out=buf[..., 32:], activation="silu")
    assert got.data_ptr() == buf[..., 32:].data_ptr() and torch.equal(buf[..., :32], torch.zeros(2, 11, 32))
    monkeypatch.setattr(cpu_kernel, "library", lambda: None)  # as ESH_CPU_KERNEL=0 gives
    torch.testing.assert_close(buf[..., 32:], depthwise_conv(x, w, b, activation="silu"), rtol=1e-6, atol=1e-6)


def test_kernel_off_uses_the_pytorch_form_with_its_silu(monkeypatch):
    monkeypatch.setenv("ESH_CPU_KERNEL", "0")
    assert cpu_kernel.library() is None
    torch.manual_seed(6)
    x = torch.randn(2, 7, 8, requires_grad=True)
    w, b = torch.randn(8, 4, requires_grad=True), torch.randn(8, requires_grad=True)
    got = depthwise_conv(x, w, b, activation="silu")
    assert torch.equal(got, F.silu(_shifted(x, w, b)))
    assert got.grad_fn is not None


def test_unknown_activation_and_padding_out_of_range_are_input_errors():
    from esh.errors import InputError

    with pytest.raises(InputError, match="activation must be one of"):
        depthwise_conv(torch.randn(1, 3, 4), torch.randn(4, 2), activation="gelu")
    for left in (-1, 2):
        with pytest.raises(InputError, match=r"must be in \[0, 1\]"):
            depthwise_conv(torch.randn(1, 3, 4), torch.randn(4, 2), left=left)
