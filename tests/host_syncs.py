"""Records the aten ops of a call that make a GPU wait: host reads of tensor values and ops whose
output shape depends on the values (on the CPU they cost nothing, so a CPU test looks for them)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",  # .item(), int(t), bool(t), .tolist()
        "nonzero",
        "masked_select",
        "bincount",
        "unique",
        "_unique2",
        "unique_consecutive",
        "repeat_interleave",
        "equal",
        "is_nonzero",
    }
)


class HostSyncs(TorchDispatchMode):
    """``with HostSyncs() as syncs: ...`` then ``syncs.ops``: the syncing ops, in call order (a
    boolean-mask index counts as ``index(bool)``)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.ops.append(name)
        elif name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        ):
            self.ops.append(f"{name}(bool)")
        return func(*args, **(kwargs or {}))
