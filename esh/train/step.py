"""The optimisation step both trainers take: which parameters get weight decay, the auxiliary
loss a model adds to the objective, and accumulate / unscale / clip / step / zero_grad with DDP's
``no_sync`` while gradients accumulate."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

# Mamba's state parameters (and the backward direction's, in bidirectional mixers): decaying the
# log-decay rates or the skip towards zero changes what the recurrence remembers, so mamba_ssm
# marks them ``_no_weight_decay``; matched by name too, for mixers that do not mark them.
SSM_NO_DECAY_NAMES = frozenset({"A_log", "A_b_log", "D", "D_b"})


def no_weight_decay(name: str, p: nn.Parameter, skip_names: set[str]) -> bool:
    """Whether parameter ``name`` is kept out of weight decay: 1-D parameters (biases, norm
    weights, LayerScale gammas), anything marked ``_no_weight_decay`` (mamba_ssm's protocol),
    Mamba's ``A_log`` / ``D``, and the names the model lists in ``no_weight_decay()`` (timm's)."""
    leaf = name.rsplit(".", 1)[-1]
    return p.dim() < 2 or getattr(p, "_no_weight_decay", False) or leaf in SSM_NO_DECAY_NAMES or name in skip_names


def param_groups(model: nn.Module, weight_decay: float, *, names: bool = False) -> list[dict]:
    """Two optimizer groups: ``weight_decay`` on the weight matrices and embeddings, none on the
    rest (see :func:`no_weight_decay`). Frozen parameters are left out. With ``names``, each
    group also lists its parameter names under ``param_names`` (for inspection: optimizers
    are given the groups without them, so their state dicts stay as they were)."""
    skip = getattr(model, "no_weight_decay", None)
    skip_names = set(skip()) if callable(skip) else set()
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_weight_decay(name, p, skip_names):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if names:
        groups[0]["param_names"], groups[1]["param_names"] = decay_names, no_decay_names
    return groups


FUSED_OPTIMIZERS = ("adam", "adamw")  # torch.optim classes with a fused kernel for CPU and CUDA tensors


def fused_options(optimizer: str, device: torch.device) -> dict:
    """``{"fused": True}`` where torch's fused Adam/AdamW kernel serves ``device`` (one vectorised
    pass over all parameters instead of several ops per tensor: 12.7 -> 3.0 ms per step for
    esh_vision_nano's AdamW on one CPU thread), else nothing."""
    if optimizer.lower() in FUSED_OPTIMIZERS and device.type in ("cpu", "cuda"):
        return {"fused": True}
    return {}


def auxiliary_loss(model: nn.Module, output: object, step: int) -> tuple[Tensor | None, dict]:
    """The auxiliary loss of the forward that returned ``output`` (to add to the task loss) and
    the statistics to log, one protocol for every model family:

    - a model with ``auxiliary_losses(step)`` (the vision models; ``step`` = optimizer steps
      done, for schedules): the entries whose name starts with ``loss`` are summed into the
      auxiliary loss, every entry is logged;
    - an output with ``aux_loss`` (the language models, already weighted and already part of
      their ``loss``): logged as ``aux_loss``; it is returned as None so it is not added twice.

    Logged tensors stay on the device (detached); plain numbers are floats.
    """
    total: Tensor | None = None
    logged: dict = {}
    hook = getattr(model, "auxiliary_losses", None)
    if callable(hook):
        terms = hook(step)
        for name, value in terms.items():
            if name.startswith("loss"):
                total = value if total is None else total + value
            logged[name] = value.detach() if torch.is_tensor(value) else float(value)
    aux = getattr(output, "aux_loss", None)
    if aux is not None:
        logged["aux_loss"] = aux.detach() if torch.is_tensor(aux) else float(aux)
    return total, logged


class OptimizerStep:
    """Gradient accumulation and the update, written once.

    ``with step.micro_batch(last):`` wraps the forward and backward of a micro-batch (under DDP,
    all but the last skip the gradient all-reduce); ``backward(loss)`` scales the loss for the
    accumulation (and for float16's gradient scaler); ``update()`` unscales, clips the global
    gradient norm, steps the optimizer and the scaler, and zeroes the gradients. It returns the
    gradient norm before clipping (a device tensor; NaN when not clipping).
    """

    def __init__(
        self,
        model: nn.Module,
        forward_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        grad_accum: int,
        clip_grad: float | None,
    ):
        self.model, self.forward_model = model, forward_model
        self.optimizer, self.scaler = optimizer, scaler
        self.grad_accum, self.clip_grad = grad_accum, clip_grad

    def micro_batch(self, last: bool):
        no_sync = getattr(self.forward_model, "no_sync", None)
        if not last and callable(no_sync):
            return no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss / self.grad_accum).backward()

    def update(self) -> Tensor | float:
        grad_norm: Tensor | float = float("nan")
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            full = getattr(grad_norm, "full_tensor", None)
            if callable(full):  # FSDP2: a DTensor over the sharded gradients
                grad_norm = full()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm
