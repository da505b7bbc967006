"""Random selective-scan inputs shaped like a Mamba block's, for the tests."""

from __future__ import annotations

import torch


def scan_inputs(
    batch=2,
    dim=6,
    seqlen=33,
    dstate=4,
    *,
    B_mode="variable",
    C_mode="variable",
    groups=2,
    with_D=True,
    with_z=True,
    with_bias=True,
    dtype=torch.float32,
    delta_scale=1.0,
    seed=0,
):
    """``B_mode``/``C_mode``: 'constant' (dim, N), 'variable' (batch, N, L), 'grouped' (batch, G, N, L)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    def bc(mode):
        if mode == "constant":
            return rnd(dim, dstate)
        if mode == "variable":
            return rnd(batch, dstate, seqlen)
        return rnd(batch, groups, dstate, seqlen)

    A = -torch.rand(dim, dstate, generator=g, dtype=torch.float64).mul(2).add(0.1).to(dtype)
    x = {
        "u": rnd(batch, dim, seqlen),
        "delta": (delta_scale * torch.rand(batch, dim, seqlen, generator=g, dtype=torch.float64)).to(dtype),
        "A": A,
        "B": bc(B_mode),
        "C": bc(C_mode),
        "D": rnd(dim) if with_D else None,
        "z": rnd(batch, dim, seqlen) if with_z else None,
        "delta_bias": rnd(dim, scale=0.5) if with_bias else None,
    }
    return x


def with_grad(x):
    return {k: None if v is None else v.clone().requires_grad_() for k, v in x.items()}


def run_with_grads(fn, x, seed=1, **kwargs):
    """Output, last state and the gradients of a random projection of both."""
    x = with_grad(x)
    out, last = fn(**x, return_last_state=True, **kwargs)
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    w_last = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)
    loss = (out.float() * w_out.float()).sum() + (last.float() * w_last.float()).sum()
    names = [k for k, v in x.items() if v is not None]
    grads = torch.autograd.grad(loss, [x[k] for k in names])
    return out, last, dict(zip(names, grads))


def record_backend_calls(monkeypatch, names=("cpu", "chunked")) -> list[str]:
    """Let the dispatcher choose (``ESH_SCAN_BACKEND`` and ``ESH_CPU_KERNEL`` unset) and wrap the
    backends ``names`` so that each call appends its name to the returned list."""
    import importlib

    dispatch = importlib.import_module("esh.ops.selective_scan")  # the package, not the function
    monkeypatch.delenv("ESH_SCAN_BACKEND", raising=False)
    monkeypatch.delenv("ESH_CPU_KERNEL", raising=False)
    calls: list[str] = []
    for name in names:
        fn = dispatch._IMPLS[name]
        monkeypatch.setitem(dispatch._IMPLS, name, lambda *a, _n=name, _f=fn, **k: calls.append(_n) or _f(*a, **k))
    return calls
