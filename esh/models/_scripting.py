"""``torch.jit.script`` on an esh vision model: a clear error that names what works instead.

The forward passes are Python that TorchScript's compiler does not take (the selective scan's
backend dispatch, input checks on arbitrary objects, closures). TorchScript files come from
tracing instead, which ``esh export --format torchscript`` does with the scan's reference loop
and then checks against eager PyTorch.
"""

from __future__ import annotations

__all__ = ["NotScriptable"]


class NotScriptable:
    """Mixin for the vision models (before ``nn.Module`` in the bases): ``torch.jit.script``
    calls ``__prepare_scriptable__`` before compiling, and this one refuses with guidance."""

    def __prepare_scriptable__(self):
        name = type(self).__name__
        raise RuntimeError(
            f"{name} cannot be compiled with torch.jit.script: its forward dispatches the selective "
            f"scan and checks its inputs in Python. For a TorchScript file use `esh export --format "
            f"torchscript` (or esh.export.export_model(model, path, format='torchscript')), which "
            f"records the model with torch.jit.trace on the scan's reference loop and checks the file "
            f"against eager PyTorch. For a graph to transform, torch.fx works: "
            f"timm.models.create_feature_extractor(model, return_nodes)."
        )
