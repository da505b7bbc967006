"""One recurrent step, tested against the scan."""

from __future__ import annotations

import pytest
import torch
from scan_inputs import scan_inputs

from esh.ops import selective_scan, selective_state_update
from esh.ops.selective_scan import selective_state_update_reference


@pytest.mark.parametrize("with_z", [False, True])
@pytest.mark.parametrize("with_D", [False, True])
def test_stepping_through_a_sequence_equals_the_scan(with_z, with_D):
    x = scan_inputs(batch=2, dim=6, seqlen=25, dstate=4, with_z=with_z, with_D=with_D, dtype=torch.float64)
    out, last = selective_scan(**x, delta_softplus=True, return_last_state=True)
    state = torch.zeros(2, 6, 4, dtype=torch.float64)
    steps = []
    for t in range(25):
        steps.append(
            selective_state_update(
                state,
                x["u"][..., t],
                x["delta"][..., t],
                x["A"],
                x["B"][..., t],
                x["C"][..., t],
                D=x["D"],
                z=None if x["z"] is None else x["z"][..., t],
                dt_bias=x["delta_bias"],
                dt_softplus=True,
            )
        )
    torch.testing.assert_close(torch.stack(steps, -1), out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state, last, rtol=1e-10, atol=1e-12)


def test_continuing_from_the_scan_last_state():
    x = scan_inputs(batch=1, dim=4, seqlen=12, dstate=3, dtype=torch.float64)
    full = selective_scan(**x, delta_softplus=True)
    head = {k: (v[..., :11] if v is not None and v.dim() == 3 else v) for k, v in x.items()}
    _, state = selective_scan(**head, delta_softplus=True, return_last_state=True)
    y = selective_state_update(
        state,
        x["u"][..., 11],
        x["delta"][..., 11],
        x["A"],
        x["B"][..., 11],
        x["C"][..., 11],
        D=x["D"],
        z=x["z"][..., 11],
        dt_bias=x["delta_bias"],
        dt_softplus=True,
    )
    torch.testing.assert_close(y, full[..., 11])


def test_multi_head_form_with_groups_equals_per_head_steps():
    batch, heads, dim, n, groups = 2, 4, 3, 5, 2
    g = torch.Generator().manual_seed(0)
    state = torch.randn(batch, heads, dim, n, generator=g, dtype=torch.float64)
    x = torch.randn(batch, heads, dim, generator=g, dtype=torch.float64)
    dt = torch.rand(batch, heads, dim, generator=g, dtype=torch.float64)
    A = -torch.rand(heads, dim, n, generator=g, dtype=torch.float64)
    B = torch.randn(batch, groups, n, generator=g, dtype=torch.float64)
    C = torch.randn(batch, groups, n, generator=g, dtype=torch.float64)
    D = torch.randn(heads, dim, generator=g, dtype=torch.float64)
    expected_state = state.clone()
    outs = []
    for h in range(heads):
        s = expected_state[:, h].clone()
        outs.append(
            selective_state_update(s, x[:, h], dt[:, h], A[h], B[:, h // 2], C[:, h // 2], D=D[h], dt_softplus=True)
        )
        expected_state[:, h] = s
    out = selective_state_update(state, x, dt, A, B, C, D=D, dt_softplus=True)
    torch.testing.assert_close(out, torch.stack(outs, 1))
    torch.testing.assert_close(state, expected_state)


def test_half_precision_step_returns_input_dtype():
    state = torch.zeros(1, 4, 2)
    x = torch.randn(1, 4, dtype=torch.bfloat16)
    out = selective_state_update(state, x, x.abs(), -torch.ones(4, 2), torch.randn(1, 2), torch.randn(1, 2))
    assert out.dtype == torch.bfloat16
    assert state.abs().sum() > 0


def test_public_step_is_the_reference_step_on_cpu():
    state = torch.randn(2, 3, 4)
    args = (torch.randn(2, 3), torch.rand(2, 3), -torch.rand(3, 4), torch.randn(2, 4), torch.randn(2, 4))
    s2 = state.clone()
    torch.testing.assert_close(selective_state_update(state, *args), selective_state_update_reference(s2, *args))
    torch.testing.assert_close(state, s2)


@pytest.mark.parametrize(
    "field,bad,message",
    [
        ("x", torch.randn(2, 5), r"x must have shape \(batch, dim\) = \(2, 3\)"),
        ("A", torch.randn(3, 5), r"A must have shape \(dim, N\) = \(3, 4\)"),
        ("B", torch.randn(2, 3), r"B must have shape \(batch, N\) = \(2, 4\)"),
        ("state", torch.randn(2, 3), r"state must be \(batch, dim, N\)"),
    ],
)
def test_step_shape_errors(field, bad, message):
    args = dict(
        state=torch.zeros(2, 3, 4),
        x=torch.randn(2, 3),
        dt=torch.rand(2, 3),
        A=-torch.rand(3, 4),
        B=torch.randn(2, 4),
        C=torch.randn(2, 4),
    )
    args[field] = bad
    with pytest.raises(ValueError, match=message):
        selective_state_update(**args)


# state_batch_indices: a batch of requests, each reading and updating its own row of a cache


def _cache_step_inputs(heads: bool, batch: int = 3, cache_rows: int = 7, seed: int = 0):
    """One step's arguments for a cache of ``cache_rows`` rows; (dim=4, N=3) or (nheads=4, dim=2, N=3)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    lead = (4, 2) if heads else (4,)
    return dict(
        state=rnd(cache_rows, *lead, 3),
        x=rnd(batch, *lead),
        dt=rnd(batch, *lead),
        A=-rnd(*lead, 3).abs(),
        B=rnd(batch, 2, 3) if heads else rnd(batch, 3),
        C=rnd(batch, 2, 3) if heads else rnd(batch, 3),
        D=rnd(*lead),
        z=rnd(batch, *lead),
        dt_bias=rnd(*lead),
        dt_softplus=True,
    )


@pytest.mark.parametrize("heads", [False, True])
def test_stepping_requests_through_rows_of_a_cache_equals_the_scan_of_each_sequence(heads):
    # three sequences live in rows 5, 0 and 3 of a 7-row cache; the batch order changes every
    # step, and a padding request (-1) rides along at the end
    batch, nheads, headdim, n, seqlen = 3, 2, 3, 4, 9
    x = scan_inputs(batch=batch, dim=nheads * headdim, seqlen=seqlen, dstate=n, dtype=torch.float64, seed=3)
    out, last = selective_scan(**x, delta_softplus=True, return_last_state=True)
    lead = (nheads, headdim) if heads else (nheads * headdim,)  # the multi-head form splits dim
    bc = (1, n) if heads else (n,)

    def requests(v, t, order, shape):
        v = v[order, :, t].reshape(batch, *shape)
        return torch.cat([v, torch.ones_like(v[:1])])

    g = torch.Generator().manual_seed(1)
    cache = torch.randn(7, *lead, n, generator=g, dtype=torch.float64)
    slots = torch.tensor([5, 0, 3])
    cache[slots] = 0
    before = cache.clone()
    steps = torch.empty(seqlen, batch, *lead, dtype=torch.float64)
    for t in range(seqlen):
        order = torch.randperm(batch, generator=g)
        y = selective_state_update(
            cache,
            requests(x["u"], t, order, lead),
            requests(x["delta"], t, order, lead),
            x["A"].reshape(*lead, n),
            requests(x["B"], t, order, bc),
            requests(x["C"], t, order, bc),
            D=x["D"].reshape(lead),
            z=requests(x["z"], t, order, lead),
            dt_bias=x["delta_bias"].reshape(lead),
            dt_softplus=True,
            state_batch_indices=torch.cat([slots[order], torch.tensor([-1])]).int(),
        )
        assert torch.equal(y[-1], torch.zeros(lead, dtype=torch.float64))
        steps[t, order] = y[:-1]
    torch.testing.assert_close(steps.flatten(2).permute(1, 2, 0), out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cache[slots].reshape(last.shape), last, rtol=1e-10, atol=1e-12)
    others = torch.tensor([1, 2, 4, 6])
    assert torch.equal(cache[others], before[others])


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("heads", [False, True])
def test_indexed_step_equals_the_plain_step_on_the_gathered_rows(heads, index_dtype):
    args = _cache_step_inputs(heads)
    indices = torch.tensor([6, 2, 4], dtype=index_dtype)
    gathered = args["state"][indices.long()].clone()
    expected = selective_state_update(**{**args, "state": gathered})
    out = selective_state_update(**args, state_batch_indices=indices)
    assert torch.equal(out, expected)
    assert torch.equal(args["state"][indices.long()], gathered)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [False, True])
def test_rows_no_request_names_stay_untouched_bit_for_bit(heads, dtype):
    args = _cache_step_inputs(heads)
    args["state"] = args["state"].to(dtype)
    before = args["state"].clone()
    selective_state_update(**args, state_batch_indices=torch.tensor([1, 5, 3]))
    untouched = torch.tensor([0, 2, 4, 6])
    assert torch.equal(args["state"][untouched], before[untouched])
    assert not torch.equal(args["state"][[1, 5, 3]], before[[1, 5, 3]])


def test_negative_index_is_a_padding_request_with_zero_output_and_no_row_touched():
    args = _cache_step_inputs(heads=True)
    before = args["state"].clone()
    out = selective_state_update(**args, state_batch_indices=torch.tensor([4, -1, 2]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    unpadded = {k: v[[0, 2]] if k in ("x", "dt", "B", "C", "z") else v for k, v in args.items()}
    unpadded["state"] = before.clone()
    expected = selective_state_update(**unpadded, state_batch_indices=torch.tensor([4, 2]))
    assert torch.equal(out[[0, 2]], expected)
    assert torch.equal(args["state"], unpadded["state"])


def test_a_batch_of_padding_only_returns_zeros_and_leaves_the_cache_alone():
    args = _cache_step_inputs(heads=False)
    before = args["state"].clone()
    out = selective_state_update(**args, state_batch_indices=torch.tensor([-1, -1, -5]))
    assert torch.equal(out, torch.zeros_like(args["x"]))
    assert torch.equal(args["state"], before)


@pytest.mark.parametrize(
    "indices,message",
    [
        (torch.tensor([1.0, 2.0, 3.0]), r"state_batch_indices must be an int32 or int64 tensor; got torch\.float32"),
        (torch.tensor([True, False, True]), r"must be an int32 or int64 tensor; got torch\.bool"),
        ([1, 2, 3], r"must be an int32 or int64 tensor; got list"),
        (torch.tensor([1, 2]), r"state_batch_indices must have shape \(batch,\) = \(3,\); got \(2,\)"),
        (torch.tensor([[1, 2, 3]]), r"state_batch_indices must have shape \(batch,\) = \(3,\); got \(1, 3\)"),
        (torch.tensor([1, 7, 3]), r"must be below state\.shape\[0\] = 7 \(negative: padding\); got 7"),
        (torch.tensor([2, 0, 2]), r"names state row 2 more than once"),
    ],
)
def test_bad_state_batch_indices_raise_one_line_value_errors_before_any_write(indices, message):
    args = _cache_step_inputs(heads=False)
    before = args["state"].clone()
    with pytest.raises(ValueError, match=message) as info:
        selective_state_update(**args, state_batch_indices=indices)
    assert "\n" not in str(info.value)
    assert torch.equal(args["state"], before)


def test_without_indices_the_state_batch_must_still_be_the_request_batch():
    args = _cache_step_inputs(heads=False)  # 7 state rows, 3 requests
    with pytest.raises(ValueError, match=r"x must have shape \(batch, dim\) = \(7, 4\)"):
        selective_state_update(**args)


def _fake_mamba_cuda(monkeypatch, takes_indices: bool) -> list[dict]:
    """Route the step to a recording stand-in for mamba_ssm's kernel (the reference, or the
    reference with mamba_ssm's index semantics), as on a CUDA machine with mamba_ssm."""
    from esh.ops.selective_scan import mamba_cuda, state_update

    calls: list[dict] = []

    def kernel(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None):
        calls.append({"rows": state.shape[0], "indices": state_batch_indices})
        if state_batch_indices is None:
            return selective_state_update_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        rows = state_batch_indices.long()
        picked = state[rows]
        out = selective_state_update_reference(picked, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        state[rows] = picked
        return out

    monkeypatch.setattr(state_update, "_on_mamba_cuda", lambda state: True)
    monkeypatch.setattr(mamba_cuda, "takes_state_batch_indices", lambda: takes_indices)
    monkeypatch.setattr(mamba_cuda, "selective_state_update_cuda", kernel)
    return calls


@pytest.mark.parametrize("takes_indices", [True, False])
def test_on_mamba_cuda_the_indices_reach_its_kernel_when_it_takes_them(monkeypatch, takes_indices):
    args = _cache_step_inputs(heads=True)
    indices = torch.tensor([6, 2, 4])
    stepped_rows = args["state"][indices].clone()
    expected = selective_state_update(**{**args, "state": stepped_rows})
    calls = _fake_mamba_cuda(monkeypatch, takes_indices)
    out = selective_state_update(**args, state_batch_indices=indices)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(args["state"][indices], stepped_rows)
    assert len(calls) == 1
    if takes_indices:  # one kernel call on the whole cache, indices passed through
        assert calls[0]["rows"] == 7 and torch.equal(calls[0]["indices"], indices)
    else:  # an older mamba_ssm: the gathered rows only, no indices
        assert calls[0]["rows"] == 3 and calls[0]["indices"] is None


@pytest.mark.parametrize(
    "installed, takes", [("2.2.6.post3", True), ("2.3.2", True), ("2.2.4", False), ("2.2.6", False)]
)
def test_the_index_pass_through_needs_mamba_ssm_2_2_6_post3(monkeypatch, installed, takes):
    import importlib.metadata

    from esh.ops.selective_scan import mamba_cuda

    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed)
    mamba_cuda.takes_state_batch_indices.cache_clear()
    try:
        assert mamba_cuda.takes_state_batch_indices() is takes
    finally:
        mamba_cuda.takes_state_batch_indices.cache_clear()


# backend=: which implementation runs the step


def test_an_unknown_step_backend_is_a_value_error_naming_where_it_came_from(monkeypatch):
    args = _cache_step_inputs(heads=False, cache_rows=3)
    with pytest.raises(ValueError, match=r"unknown backend 'fast' \(from backend=\)"):
        selective_state_update(**args, backend="fast")
    monkeypatch.setenv("ESH_SCAN_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"unknown backend 'fast' \(from ESH_SCAN_BACKEND\)"):
        selective_state_update(**args)


@pytest.mark.parametrize("name", ["chunked", "cpu", "reference"])
def test_the_scan_backend_names_chunked_and_cpu_mean_the_reference_step(monkeypatch, name):
    from esh.ops.selective_scan import use_backend

    args = _cache_step_inputs(heads=True, cache_rows=3)
    expected_state = args["state"].clone()
    expected = selective_state_update_reference(**{**args, "state": expected_state})
    calls = _fake_mamba_cuda(monkeypatch, takes_indices=True)  # the default would take mamba_ssm's kernel
    monkeypatch.setenv("ESH_SCAN_BACKEND", name)
    assert torch.equal(selective_state_update(**args), expected)
    with use_backend(name):
        selective_state_update(**{**args, "state": args["state"].clone()})
    assert calls == []
    assert torch.equal(args["state"], expected_state)


def test_the_triton_step_on_cpu_tensors_without_the_interpreter_is_unavailable(monkeypatch):
    pytest.importorskip("triton")
    from esh.ops.selective_scan import BackendUnavailableError, triton_state_update

    monkeypatch.setattr(triton_state_update, "_interpreted", lambda: False)
    args = _cache_step_inputs(heads=False, cache_rows=3)
    before = args["state"].clone()
    with pytest.raises(BackendUnavailableError, match=r"only in Triton's interpreter \(TRITON_INTERPRET=1 set before"):
        selective_state_update(**args, backend="triton")
    assert torch.equal(args["state"], before)


def test_the_triton_step_without_triton_is_unavailable(monkeypatch):
    from esh.ops.selective_scan import BackendUnavailableError, triton_state_update

    monkeypatch.setattr(triton_state_update, "triton", None)
    args = _cache_step_inputs(heads=False, cache_rows=3)
    with pytest.raises(BackendUnavailableError, match="backend 'triton' needs the triton package"):
        selective_state_update(**args, backend="triton")


def test_the_mamba_ssm_step_on_cpu_tensors_is_unavailable():
    from esh.ops.selective_scan import BackendUnavailableError

    args = _cache_step_inputs(heads=False, cache_rows=3)
    with pytest.raises(
        BackendUnavailableError, match=r"backend 'cuda' (needs the mamba-ssm package|runs only on CUDA)"
    ):
        selective_state_update(**args, backend="cuda")


@pytest.mark.parametrize(
    "mamba_ssm, triton, expected", [(True, True, "cuda"), (False, True, "triton"), (False, False, "reference")]
)
def test_the_default_step_on_cuda_is_mamba_ssm_then_triton_then_the_reference(monkeypatch, mamba_ssm, triton, expected):
    from types import SimpleNamespace

    from esh.ops.selective_scan import mamba_cuda, state_update, triton_state_update

    monkeypatch.delenv("ESH_SCAN_BACKEND", raising=False)
    monkeypatch.setattr(mamba_cuda, "state_update_available", lambda: mamba_ssm)
    monkeypatch.setattr(triton_state_update, "is_available", lambda: triton)
    cuda_state = SimpleNamespace(is_cuda=True, device=torch.device("cuda"))
    assert state_update._resolve(None, cuda_state) == expected
    assert state_update._resolve(None, torch.zeros(1)) == "reference"
    # mamba_ssm's kernel crashes without D or dt_bias: those steps go to Triton
    without = "triton" if triton else "reference"
    assert state_update._resolve(None, cuda_state, has_D_and_dt_bias=False) == without
