"""SwitchMoE's two ways of running the experts: grouped (each expert on exactly its tokens; the
group sizes read on the host) and padded (fixed-size slabs; nothing read on the host)."""

from __future__ import annotations

import pytest
import torch
from host_syncs import HostSyncs

from esh.layers import SwitchMoE

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(moe: SwitchMoE, x: torch.Tensor, mask: torch.Tensor | None):
    moe.zero_grad()
    x = x.detach().requires_grad_()
    y, aux = moe(x, mask)
    (y.square().sum() + aux.load_balance_loss + aux.z_loss).backward()
    return y.detach(), aux, x.grad, {n: p.grad for n, p in moe.named_parameters()}


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_padded_dispatch_gives_the_grouped_outputs_statistics_and_gradients(capacity_factor, masked):
    moe = SwitchMoE(16, 24, n_experts=4, capacity_factor=capacity_factor)
    x = torch.randn(3, 10, 16)
    mask = torch.rand(3, 10) > 0.3 if masked else None
    moe.dispatch = "grouped"
    y0, aux0, dx0, dp0 = _run(moe, x, mask)
    moe.dispatch = "padded"
    y1, aux1, dx1, dp1 = _run(moe, x, mask)
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx1, dx0, rtol=1e-6, atol=1e-6)
    for name in dp0:
        torch.testing.assert_close(dp1[name], dp0[name], rtol=1e-5, atol=1e-6, msg=name)
    for field in ("load_balance_loss", "z_loss", "dropped_fraction", "expert_fraction"):
        torch.testing.assert_close(getattr(aux1, field), getattr(aux0, field), msg=field)
    if mask is not None:
        assert (y1.reshape(-1, 16)[~mask.reshape(-1)] == 0).all()


def test_padded_dispatch_drops_the_overflow_like_grouped():
    moe = SwitchMoE(8, 8, n_experts=2, capacity_factor=0.5)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 1.0  # every token with x[:, 0] > 0 goes to expert 0
    x = torch.randn(12, 8).abs()
    for dispatch in ("grouped", "padded"):
        moe.dispatch = dispatch
        y, aux = moe(x)
        # capacity ceil(0.5 * 12 / 2) = 3: the first three tokens get an output, the rest none
        assert (y[:3] != 0).any(1).all() and (y[3:] == 0).all(), dispatch
        assert aux.dropped_fraction.item() == pytest.approx(0.75)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_padded_dispatch_reads_nothing_on_the_host(capacity_factor):
    moe = SwitchMoE(16, 24, n_experts=4, capacity_factor=capacity_factor, dispatch="padded")
    x = torch.randn(2, 9, 16, requires_grad=True)
    mask = torch.rand(2, 9) > 0.3
    with HostSyncs() as syncs:
        y, aux = moe(x, mask)
        (y.sum() + aux.load_balance_loss + aux.z_loss).backward()
    assert syncs.ops == []


def test_grouped_dispatch_reads_the_group_sizes():
    moe = SwitchMoE(16, 24, n_experts=4, dispatch="grouped")
    with HostSyncs() as syncs:
        moe(torch.randn(2, 9, 16))
    assert "bincount" in syncs.ops


def test_auto_dispatch_is_grouped_on_the_cpu(monkeypatch):
    moe = SwitchMoE(16, 24, n_experts=4)
    calls = []
    monkeypatch.setattr(moe, "_run_grouped", lambda *a: calls.append("grouped") or a[0])
    monkeypatch.setattr(moe, "_run_padded", lambda *a: calls.append("padded") or a[0])
    moe(torch.randn(2, 3, 16))
    assert moe.dispatch == "auto" and calls == ["grouped"]


def test_unknown_dispatch_is_an_error():
    with pytest.raises(ValueError, match="dispatch must be one of"):
        SwitchMoE(16, 24, dispatch="dense")
