"""Pass-through to mamba_ssm's fused CUDA kernels, used when the package is installed and
the inputs live on a CUDA device. Same signature and semantics as the other backends."""

from __future__ import annotations

import importlib.util
from functools import cache

import torch
from torch import Tensor


@cache
def is_available() -> bool:
    """Whether mamba_ssm's compiled selective-scan extension imports. mamba_ssm 2.3.x installs
    without it unless built with ``MAMBA_KEEP_CUDA_BUILD=TRUE``: ``import mamba_ssm`` then works
    and its ``selective_scan_fn`` raises, so the package alone is not enough."""
    if importlib.util.find_spec("mamba_ssm") is None:
        return False
    try:
        import selective_scan_cuda  # noqa: F401
    except ImportError:
        return False
    return True


@cache
def state_update_available() -> bool:
    """Whether mamba_ssm's Triton ``selective_state_update`` is there (it needs no compiled extension)."""
    return importlib.util.find_spec("mamba_ssm") is not None and importlib.util.find_spec("triton") is not None


def unsupported_reason(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Tensor | None, initial_state) -> str | None:
    """Why mamba_ssm's CUDA kernel cannot run these inputs, or None (``selective_scan_cuda``
    casts delta, z, B and C to the dtypes it checks for)."""
    if initial_state is not None:
        return "it takes no initial_state"
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"it computes in float32/float16/bfloat16, not {u.dtype}"
    groups = [t.shape[1] if t.dim() == 4 else 1 for t in (B, C) if t.dim() != 2]
    if len(groups) == 2 and groups[0] != groups[1]:
        return "B and C must have the same number of groups"
    return None


def _import_interface():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as e:  # installed but broken (e.g. built for another CUDA)
        raise RuntimeError(
            f"mamba_ssm is installed but its CUDA kernels could not be imported ({e}); "
            "use backend='chunked' or reinstall mamba-ssm for this torch/CUDA"
        ) from e
    return selective_scan_fn


def selective_scan_cuda(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    fn = _import_interface()
    # what its TORCH_CHECKs require: delta, z and input-dependent B/C in u's dtype, constant B/C,
    # A, D and delta_bias in float32, and a unit stride along L (copied only where it is missing)
    delta = _unit_last_stride(delta.to(u.dtype))
    z = None if z is None else _unit_last_stride(z.to(u.dtype))
    B, C = (_unit_last_stride(t.float() if t.dim() == 2 else t.to(u.dtype)) for t in (B, C))
    D = None if D is None else D.float()
    delta_bias = None if delta_bias is None else delta_bias.float()
    return fn(_unit_last_stride(u), delta, A.float(), B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


# mamba_ssm takes state_batch_indices since 2.2.3 and treats a negative one as padding (zero
# output, no row touched) since 2.2.6.post3; older releases would read out of bounds there.
STATE_BATCH_INDICES_SINCE = "2.2.6.post3"


@cache
def takes_state_batch_indices() -> bool:
    """Whether the installed mamba_ssm's ``selective_state_update`` has esh's index contract."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        return Version(version("mamba_ssm")) >= Version(STATE_BATCH_INDICES_SINCE)
    except (PackageNotFoundError, ValueError):
        return False


def selective_state_update_cuda(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None
):
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except ImportError as e:
        raise RuntimeError(f"mamba_ssm's selective_state_update could not be imported ({e})") from e
    kwargs = {} if state_batch_indices is None else {"state_batch_indices": state_batch_indices}
    return selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, **kwargs)
