"""Pass-through to mamba_ssm's fused CUDA kernels, used when the package is installed and
the inputs live on a CUDA device. Same signature and semantics as the other backends."""

from __future__ import annotations

import importlib.util
from functools import cache

from torch import Tensor


@cache
def is_available() -> bool:
    return importlib.util.find_spec("mamba_ssm") is not None


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
    # the kernel wants a contiguous last axis and float32 D / delta_bias
    u, delta = u.contiguous(), delta.contiguous()
    B, C = B.contiguous(), C.contiguous()
    z = None if z is None else z.contiguous()
    D = None if D is None else D.float()
    delta_bias = None if delta_bias is None else delta_bias.float()
    return fn(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus, return_last_state)


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
