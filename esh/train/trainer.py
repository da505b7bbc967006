"""The vision trainer: every esh vision model and any timm model, on the shared training core.

Built from timm's pieces (optimizers, cosine schedule with warm-up stepped per update,
label-smoothing and mixup losses, model EMA, transforms) and esh.train's (distributed set-up,
the optimisation step, checkpoints, logs, the output-directory lock). A model may contribute
its own loss terms through ``auxiliary_losses(step)`` (see ``esh.train.step.auxiliary_loss``:
entries named ``loss*`` join the objective, all are logged per step in ``steps.csv``). A model
whose class sets ``default_grad_checkpointing = True`` is trained with block-level gradient
checkpointing where its activations would not fit comfortably in the device's free memory
(``esh.train.memory``); ``grad_checkpointing=True/False`` decides instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from esh._compat import import_timm, require
from esh._io import clean_stale_temps, save_figure, write_text
from esh.data.datasets import build_datasets, collate_check
from esh.errors import InputError
from esh.models._checkpoint import CheckpointError
from esh.models.resolve import build_model
from esh.train.checkpoint import load_training_checkpoint, rng_state, save_torch, seed_everything, set_rng_state
from esh.train.distributed import close_distributed, init_distributed, wrap_ddp
from esh.train.lock import OutputLock
from esh.train.logs import LOG_KINDS, MetricsLog, StepLog, check_finite, read_floats
from esh.train.memory import needs_grad_checkpointing
from esh.train.precision import AMP_DTYPES, amp_dtype_for, autocast, enable_tf32, grad_scaler
from esh.train.settings import (
    canonical,
    check_float,
    check_int,
    check_resume_overrides,
    check_steps_or_fraction,
    config_from_dict,
    setting,
    steps_of,
    with_aliases,
)
from esh.train.step import OptimizerStep, auxiliary_loss, fused_options, param_groups

DEFAULT_MODEL = "mambavision_nano"
MIN_IMG_SIZE, MAX_IMG_SIZE = 8, 4096
# what an exact resume cannot change: the run would no longer be the one that was saved
RESUME_FIXED = ("model", "data", "batch_size", "grad_accum", "seed", "img_size", "num_classes", "model_kwargs")


@with_aliases
@dataclass
class VisionTrainConfig:
    """The settings of ``VisionTrainer`` (and the options of ``esh train``)."""

    WHAT: ClassVar[str] = "vision training"
    ALIASES: ClassVar[dict[str, str]] = {}

    model: str = setting(DEFAULT_MODEL, "model name: esh's (esh models) or timm's")
    data: str = setting("digits", "'digits' (embedded MNIST-5k), DIR with train/ and val/, FILE.npz, or hf:NAME")
    epochs: int = setting(8, "epochs")
    batch_size: int = setting(64, "global batch size (all processes together)")
    lr: float = setting(3e-3, "peak learning rate")
    weight_decay: float = setting(0.05, "AdamW-style weight decay (never on biases, norms, Mamba's A_log and D)")
    optimizer: str = setting("adamw", "timm optimizer: adamw, lamb, sgd, adamw8bit, ...")
    warmup_epochs: float = setting(1.0, "linear warm-up epochs before the cosine decay")
    min_lr: float = setting(1e-5, "end of the cosine decay")
    img_size: int | None = setting(None, "input size (default: the model's)")
    num_classes: int | None = setting(None, "classifier outputs (default: the number of classes in the data)")
    checkpoint: str | None = setting(None, "initial weights")
    amp: bool = setting(False, "mixed-precision training", cli=False)
    amp_dtype: str | None = setting(None, "bfloat16 or float16 (default: bfloat16 where the device has it)", cli=False)
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    clip_grad: float | None = setting(5.0, "gradient-norm clipping (0: off)")
    label_smoothing: float = setting(0.1, "label smoothing of the cross-entropy")
    mixup: float = setting(0.0, "mixup alpha (0: off)")
    cutmix: float = setting(0.0, "cutmix alpha (0: off)")
    ema: bool = setting(False, "keep an EMA of the weights and validate it too")
    ema_decay: float = setting(0.999, "decay of the weights' EMA")
    grad_checkpointing: bool | None = setting(
        None,
        "recompute blocks in the backward to save memory (default: for models that ask for it, when "
        "their activations would take over half the free memory)",
    )
    # ESH-Vision's routing terms (models with ``set_routing_terms``); unset: the model's values
    ponder_weight: float | None = setting(
        None, "ESH-Vision: weight of the ponder cost after its ramp (model default 0.01)"
    )
    ponder_warmup: float | None = setting(
        None,
        "ESH-Vision: optimizer steps with no ponder cost; 0 < v < 1 is a fraction of the run's steps, "
        "v >= 1 a number of steps (model default 15000 steps)",
    )
    ponder_ramp: float | None = setting(
        None,
        "ESH-Vision: steps of the ponder cost's linear ramp after the warm-up; a fraction of the run "
        "or a number of steps, as --ponder-warmup (model default 5000 steps)",
    )
    alpha_var_weight: float | None = setting(
        None, "ESH-Vision: weight of the alpha-variance bonus, -w * Var(alpha) (model default 0.1; 0: off)"
    )
    routing_budget: float | None = setting(
        None,
        "ESH-Vision: target attention fraction F in [0, 1]; adds w * mean over blocks of "
        "(mean alpha - F)^2 to the loss, logged as loss_budget (default: no budget term)",
    )
    routing_budget_weight: float | None = setting(
        None, "ESH-Vision: weight w of the routing-budget term (model default 1.0)"
    )
    model_kwargs: dict = setting(help="extra model-builder arguments", factory=dict, cli=False)
    channels_last: bool = setting(False, "channels-last memory format")
    compile: bool = setting(False, "torch.compile the model")
    randaug: str | None = setting(None, "timm augmentation policy, e.g. rand-m9-mstd0.5")
    hflip: float = setting(0.0, "horizontal-flip probability (digits are not symmetric)")
    color_jitter: float = setting(0.0, "colour jitter strength")
    re_prob: float = setting(0.0, "random-erasing probability")
    augment: bool = setting(True, "random augmentation (off: train on the evaluation transform)")
    seed: int = setting(0, "seed for everything")
    workers: int = setting(0, "data-loading processes")
    device: str = setting("cpu", "cpu, cuda, cuda:N, mps or auto")
    out: str = setting("runs/train", "output directory")
    log: str = setting("csv", "csv (always written), tensorboard or wandb")
    log_interval: int = setting(10, "write steps.csv and refresh the progress bar every N optimizer steps")
    max_steps: int | None = setting(None, "stop after this many optimizer steps")
    save_every: int = setting(0, "also checkpoint every N optimizer steps (0: at epoch ends only)")
    progress: bool = setting(True, "progress bar and per-epoch lines", cli=False)
    extra: dict = setting(help="free-form notes kept in the checkpoint", factory=dict, cli=False)

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("grad_accum", self.grad_accum, 1)
        check_float("lr", self.lr, 0.0, low_open=True)
        check_float("min_lr", self.min_lr, 0.0)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("warmup_epochs", self.warmup_epochs, 0.0)
        check_int("img_size", self.img_size, MIN_IMG_SIZE, optional=True)
        if self.img_size is not None and self.img_size > MAX_IMG_SIZE:
            raise InputError(f"img_size must be at most {MAX_IMG_SIZE} pixels; got {self.img_size}")
        check_int("num_classes", self.num_classes, 1, optional=True)
        check_float("clip_grad", self.clip_grad, 0.0, optional=True)
        check_float("label_smoothing", self.label_smoothing, 0.0, 1.0)
        if self.label_smoothing >= 1.0:
            raise InputError(f"label_smoothing must be below 1 (1 leaves no label); got {self.label_smoothing}")
        check_float("mixup", self.mixup, 0.0)
        check_float("cutmix", self.cutmix, 0.0)
        check_float("ema_decay", self.ema_decay, 0.0, 1.0)
        for name in ("hflip", "re_prob"):
            check_float(name, getattr(self, name), 0.0, 1.0)
        check_float("color_jitter", self.color_jitter, 0.0)
        check_int("workers", self.workers, 0)
        check_int("log_interval", self.log_interval, 1)
        check_int("max_steps", self.max_steps, 1, optional=True)
        check_int("save_every", self.save_every, 0)
        check_int("seed", self.seed, 0)
        for name in ("ponder_weight", "alpha_var_weight", "routing_budget_weight"):
            check_float(name, getattr(self, name), 0.0, optional=True)
        check_steps_or_fraction("ponder_warmup", self.ponder_warmup, optional=True)
        check_steps_or_fraction("ponder_ramp", self.ponder_ramp, optional=True)
        check_float("routing_budget", self.routing_budget, 0.0, 1.0, optional=True)
        if self.log not in LOG_KINDS:
            raise InputError(f"log must be one of {', '.join(LOG_KINDS)}; got {self.log!r}")
        if self.amp_dtype is not None and self.amp_dtype not in AMP_DTYPES:
            raise InputError(f"amp_dtype must be one of {', '.join(AMP_DTYPES)}; got {self.amp_dtype!r}")
        if not isinstance(self.model_kwargs, dict):
            raise InputError(f"model_kwargs must be a dict; got {type(self.model_kwargs).__name__}")

    @classmethod
    def from_dict(cls, d: dict) -> VisionTrainConfig:
        """From a saved config; unknown keys are an error naming the close matches."""
        return config_from_dict(cls, d)


class EpochSampler(Sampler[int]):
    """A permutation drawn from (seed, epoch) alone, so a resumed run sees the same order.

    The permutation is cut into global batches of ``global_batch`` samples (the last partial
    one dropped); with ``world`` processes, rank r takes the r-th contiguous share of every
    global batch, so N processes see exactly the batches one process would. ``skip`` drops
    the global batches already done in the epoch.
    """

    def __init__(self, n: int, seed: int, global_batch: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.global_batch, self.rank, self.world = n, seed, global_batch, rank, world
        self.epoch = self.skip = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        batches = perm[: self.n // self.global_batch * self.global_batch].view(-1, self.global_batch)
        share = self.global_batch // self.world
        return iter(batches[self.skip :, self.rank * share : (self.rank + 1) * share].reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.n // self.global_batch - self.skip) * (self.global_batch // self.world)


def _build_model(cfg: VisionTrainConfig, num_classes: int) -> nn.Module:
    """The model to train, through the resolver every command uses: an esh model by name, else
    any timm model (its checkpoint read with esh's safe loader), built for ``img_size``."""
    return build_model(
        cfg.model, checkpoint_path=cfg.checkpoint, num_classes=num_classes, img_size=cfg.img_size, **cfg.model_kwargs
    )


ROUTING_TERMS = ("ponder_weight", "ponder_warmup", "ponder_ramp", "alpha_var_weight", "routing_budget")


def _set_routing_terms(model: nn.Module, cfg: VisionTrainConfig, total_steps: int) -> None:
    """Hand the routing-term settings that were given to the model's ``set_routing_terms``, the
    warm-up and ramp turned into optimizer steps of this run (``total_steps``). A model without
    routing terms given one is an InputError."""
    given = {name: getattr(cfg, name) for name in (*ROUTING_TERMS, "routing_budget_weight")}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return
    hook = getattr(model, "set_routing_terms", None)
    if not callable(hook):
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise InputError(f"{flags}: {cfg.model} has no routing terms (they apply to the esh_vision models)")
    for name in ("ponder_warmup", "ponder_ramp"):
        if name in given:
            given[name + "_steps"] = steps_of(given.pop(name), total_steps)
    hook(**given)


def _transforms(model: nn.Module, cfg: VisionTrainConfig):
    timm = import_timm()
    data_cfg = timm.data.resolve_data_config(model=model)
    size = cfg.img_size or data_cfg["input_size"][-1]
    common = dict(
        input_size=(3, size, size), interpolation=data_cfg["interpolation"], mean=data_cfg["mean"], std=data_cfg["std"]
    )
    try:
        train = timm.data.create_transform(
            **common,
            is_training=True,
            scale=(0.8, 1.0),
            hflip=cfg.hflip,
            auto_augment=cfg.randaug,
            color_jitter=cfg.color_jitter,
            re_prob=cfg.re_prob,
        )
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise InputError(
            f"randaug {cfg.randaug!r} is not a timm augmentation policy (e.g. rand-m9-mstd0.5, augmix-m5, "
            f"original): {e}"
        ) from None
    val = timm.data.create_transform(**common, is_training=False, crop_pct=1.0)
    return (train if cfg.augment else val), val


class VisionTrainer:
    """Train a vision classifier: ``VisionTrainer(cfg).fit()``; ``resume(path)`` first continues
    a saved run exactly."""

    def __init__(self, cfg: VisionTrainConfig):
        self.cfg = cfg
        setup = init_distributed(cfg.device)  # under torchrun: cuda:LOCAL_RANK, the process group
        self.device, self.rank, self.world = setup.device, setup.rank, setup.world
        self.out = Path(cfg.out)
        seed_everything(cfg.seed)
        self.train_set, self.val_set, self.classes = build_datasets(cfg.data, seed=cfg.seed)
        self.num_classes = cfg.num_classes or len(self.classes)
        if self.num_classes < len(self.classes):
            raise InputError(f"the data has {len(self.classes)} classes but num_classes={self.num_classes}")
        self.model = _build_model(cfg, self.num_classes)
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.train_set.transform, self.val_set.transform = _transforms(self.model, cfg)
        self.grad_checkpointing, self.grad_checkpointing_reason = self._choose_checkpointing()
        if self.grad_checkpointing and hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(True)
        if cfg.batch_size % self.world:
            raise InputError(
                f"--batch-size {cfg.batch_size} (the global batch) must divide by the {self.world} processes"
            )
        if len(self.train_set) < cfg.batch_size * cfg.grad_accum:
            raise InputError(
                f"the training split has {len(self.train_set)} images, fewer than one optimizer step takes "
                f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum})"
            )
        self.sampler = EpochSampler(len(self.train_set), cfg.seed, cfg.batch_size, self.rank, self.world)
        # the loader draws worker seeds from its own generator, not the global RNG that the
        # augmentations use, so that a resumed run replays the same random numbers; on CUDA
        # batches come in pinned memory, so that their copies overlap the computation
        pin = self.device.type == "cuda"
        self.loader = DataLoader(
            self.train_set,
            cfg.batch_size // self.world,
            sampler=self.sampler,
            num_workers=cfg.workers,
            drop_last=True,
            generator=torch.Generator().manual_seed(cfg.seed),
            pin_memory=pin,
        )
        self.val_loader = DataLoader(self.val_set, cfg.batch_size, num_workers=cfg.workers, pin_memory=pin)
        self.steps_per_epoch = max(1, len(self.train_set) // cfg.batch_size // cfg.grad_accum)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        _set_routing_terms(self.model, cfg, self.total_steps)
        import_timm()
        import timm.loss
        import timm.optim
        import timm.scheduler
        import timm.utils

        opt_name = cfg.optimizer
        if opt_name in ("adamw8bit", "adam8bit"):  # bitsandbytes, an optional extra
            require("bitsandbytes", "bnb", f"--optimizer {opt_name}")
            opt_name = "bnb" + opt_name
        groups = param_groups(self.model, cfg.weight_decay)
        try:
            self.optimizer = timm.optim.create_optimizer_v2(
                groups, opt_name, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused_options(opt_name, self.device)
            )
        except (AssertionError, ValueError) as e:
            if opt_name.lower() in timm.optim.list_optimizers():
                raise
            raise InputError(f"unknown optimizer {cfg.optimizer!r}: see timm.optim.list_optimizers()") from e
        self.scheduler, _ = timm.scheduler.create_scheduler_v2(
            self.optimizer,
            sched="cosine",
            num_epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.lr * 1e-3,
            min_lr=cfg.min_lr,
            updates_per_epoch=self.steps_per_epoch,
            step_on_epochs=False,
        )
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = timm.data.Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                label_smoothing=cfg.label_smoothing,
                num_classes=self.num_classes,
            )
            self.criterion = timm.loss.SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        amp_dtype_for(self.device, cfg.amp_dtype)  # a bad name fails here, not at the first step
        self.autocast = lambda: autocast(self.device, cfg.amp, cfg.amp_dtype)
        self.scaler = grad_scaler(self.device, cfg.amp, cfg.amp_dtype)
        enable_tf32(self.device)
        self.ema = timm.utils.ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema else None
        self.forward_model = self.model
        if self.world > 1:
            self.forward_model = wrap_ddp(self.model, self.device)
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.stepper = OptimizerStep(
            self.model, self.forward_model, self.optimizer, self.scaler, cfg.grad_accum, cfg.clip_grad
        )
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.best_acc, self.history = -1.0, []
        self.means = _RunningMeans()  # the current epoch's training loss and accuracy so far
        self.step_log: StepLog | None = None

    # --- checkpoints --------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "arch": self.cfg.model,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": None if self.ema is None else self.ema.module.state_dict(),
            "rng": rng_state(self.device),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "epoch_sums": self.means.sums(),
            "best_acc": self.best_acc,
            "history": self.history,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "config": asdict(self.cfg),
        }

    def save(self, name: str = "last.pth") -> Path:
        path = self.out / name
        save_torch(self.state(), path)
        return path

    def resume(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "last.pth"
        ckpt = load_training_checkpoint(path)
        if ckpt.get("arch") != self.cfg.model:
            raise CheckpointError(f"{path} was written for {ckpt.get('arch')}, not {self.cfg.model}")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            if self.ema is not None and ckpt.get("ema") is not None:
                self.ema.module.load_state_dict(ckpt["ema"])
            set_rng_state(ckpt["rng"], self.device)
            self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
            self.global_step, self.best_acc = int(ckpt["global_step"]), float(ckpt["best_acc"])
            self.history = list(ckpt["history"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(
                f"{path} does not fit {self.cfg.model} with {self.num_classes} classes: {e}"
            ) from None
        self.means = _RunningMeans.from_sums(ckpt.get("epoch_sums") if self.step_in_epoch else None)

    # --- loops --------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The objective, and the model's statistics to log (left on the device: see logs.py)."""
        loss = self.criterion(logits.float(), targets)
        aux, logged = auxiliary_loss(self.model, logits, self.global_step)
        if aux is not None:
            loss = loss + aux
        return loss, logged

    def train_epoch(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.model.train()
        self.sampler.epoch, self.sampler.skip = self.epoch, self.step_in_epoch * cfg.grad_accum
        if self.step_in_epoch == 0:
            self.means = _RunningMeans()
        means = self.means
        start = time.perf_counter()
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress or self.rank != 0,
            dynamic_ncols=True,
        )
        micro = 0
        steps: list[dict] = []  # the step-log rows not yet read from the device
        for images, targets in self.loader:
            if self.step_in_epoch >= self.steps_per_epoch:
                break
            collate_check(self.num_classes, targets, cfg.data)
            images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            hard_targets = targets
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            micro += 1
            with self.stepper.micro_batch(last=micro % cfg.grad_accum == 0):
                with self.autocast():
                    logits = self.forward_model(images)
                loss, logged = self._loss(logits, targets)
                self.stepper.backward(loss)
            means.add(loss.detach(), (logits.argmax(-1) == hard_targets).sum(), len(images))
            if micro % cfg.grad_accum:
                continue
            self.stepper.update()
            if self.ema is not None:
                self.ema.update(self.model, step=self.global_step)
            self.global_step += 1
            self.step_in_epoch += 1
            self.scheduler.step_update(num_updates=self.global_step)
            lr = self.optimizer.param_groups[0]["lr"]
            steps.append({"step": self.global_step, "loss": loss.detach(), "lr": lr, **logged})
            bar.update(1)
            saving = cfg.save_every and self.global_step % cfg.save_every == 0 and self.rank == 0
            if saving or self.global_step % cfg.log_interval == 0:  # a checkpoint's steps are logged
                self._log_steps(steps, means, bar, start)
            if saving:
                self.save()
            if cfg.max_steps and self.global_step >= cfg.max_steps:
                break
        self._log_steps(steps, means, bar, start)
        bar.close()
        seconds = time.perf_counter() - start
        return {
            "train_loss": means.loss_sum / max(means.total, 1),
            "train_acc": 100 * means.correct / max(means.total, 1),
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": means.seen / max(seconds, 1e-9),
        }

    def _log_steps(self, steps: list[dict], means: _RunningMeans, bar, start: float) -> None:
        """Read the steps' values from the device (one wait), stop if the loss is not finite,
        write them to steps.csv and show the epoch's running means."""
        rows = means.read(steps)
        steps.clear()
        check_finite(rows)
        if not rows:
            return
        if self.step_log is not None:
            for row in rows:
                self.step_log.write(row)
        logged = {k: v for k, v in rows[-1].items() if k not in ("step", "loss", "lr")}
        bar.set_postfix(
            loss=f"{means.loss_sum / means.total:.3f}",
            acc=f"{100 * means.correct / means.total:.1f}",
            lr=f"{rows[-1]['lr']:.2e}",
            img_s=f"{means.seen / (time.perf_counter() - start):.0f}",
            **{k: f"{v:.3g}" for k, v in logged.items()},
        )

    @torch.no_grad()
    def validate(self, model: nn.Module | None = None) -> dict[str, float]:
        model = model or self.model
        model.eval()
        batches = []
        for images, targets in self.val_loader:
            collate_check(self.num_classes, targets, self.cfg.data)
            images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            with self.autocast():
                logits = model(images).float()
            loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
            batches.append({"loss": loss, "correct": (logits.argmax(-1) == targets).sum(), "n": len(targets)})
        rows = read_floats(batches)  # one wait for the device, after the last batch
        loss_sum, correct, total = 0.0, 0, 0
        for row in rows:
            loss_sum += row["loss"]
            correct += int(row["correct"])
            total += row["n"]
        return {"val_loss": loss_sum / max(total, 1), "val_acc": 100 * correct / max(total, 1)}

    def fit(self) -> dict:
        """Train to ``epochs`` (or ``max_steps``); the first process holds the output directory's
        lock, validates, logs and checkpoints."""
        cfg = self.cfg
        lead = self.rank == 0
        lock = OutputLock(self.out) if lead else None
        writer = None
        try:
            if lead:
                lock.acquire()
                clean_stale_temps(self.out)
                write_text(self.out / "config.json", json.dumps(asdict(cfg), indent=2))
                writer = MetricsLog(self.out, cfg.log)
                self.step_log = StepLog(self.out / "steps.csv", self.global_step)
            while self.epoch < cfg.epochs:
                row = {"epoch": self.epoch + 1, **self.train_epoch()}
                hit_max = bool(cfg.max_steps and self.global_step >= cfg.max_steps)
                if not (hit_max and self.step_in_epoch < self.steps_per_epoch):  # the epoch is complete
                    self.epoch += 1
                    self.step_in_epoch = 0
                    self.scheduler.step(self.epoch)
                if lead:
                    self._end_of_epoch(row, writer)
                if hit_max:
                    break
        finally:
            if writer is not None:
                writer.close()
            if self.step_log is not None:
                self.step_log.close()
            if lock is not None:
                lock.release()
        final = self.history[-1]["val_acc"] if self.history else float("nan")
        return {
            "best_val_acc": self.best_acc,
            "final_val_acc": final,
            "checkpoint": str(self.out / "best.pth"),
            "out": str(self.out),
        }

    def _choose_checkpointing(self) -> tuple[bool, str]:
        """Block checkpointing: as asked, else for the models that ask for it
        (``default_grad_checkpointing``) only where the step's activations, measured on two
        images, would take more than half the device's free memory (``esh.train.memory``)."""
        cfg = self.cfg
        if cfg.grad_checkpointing is not None:
            return bool(cfg.grad_checkpointing), "set by grad_checkpointing"
        if not getattr(self.model, "default_grad_checkpointing", False):
            return False, "the model does not ask for it"
        chans, _, size = import_timm().data.resolve_data_config(model=self.model)["input_size"]
        size = cfg.img_size or size
        self.model.train()
        # noise (from its own generator), so the router sends patches to attention and ACT as on images
        example = torch.randn(2, chans, size, size, generator=torch.Generator().manual_seed(0)).to(self.device)
        return needs_grad_checkpointing(self.model, example, cfg.batch_size // self.world)

    def _end_of_epoch(self, row: dict, writer: MetricsLog) -> None:
        row.update(self.validate())
        if self.ema is not None:
            row["val_acc_ema"] = self.validate(self.ema.module)["val_acc"]
        # an epoch cut short by max_steps and finished after a resume keeps one row: the last
        self.history = [r for r in self.history if r["epoch"] != row["epoch"]] + [row]
        writer.write(row)
        if row["val_acc"] > self.best_acc:
            self.best_acc = row["val_acc"]
            self.save("best.pth")
        self.save("last.pth")
        _plot_curves(self.history, self.out / "curves.png")
        if self.cfg.progress:
            print(
                f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}% | "
                f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2f}%"
            )


class _RunningMeans:
    """The epoch's training loss and accuracy so far, from per-batch device values that are read
    together with the step-log rows (see ``read_floats``). Its sums go into checkpoints, so an
    epoch resumed in the middle reports the same means as an uninterrupted one."""

    def __init__(self):
        self.loss_sum, self.correct, self.total = 0.0, 0, 0
        self.seen = 0  # images since this process started the epoch (for images/s)
        self.pending: list[dict] = []

    @classmethod
    def from_sums(cls, sums: dict | None) -> _RunningMeans:
        means = cls()
        if isinstance(sums, dict):
            means.loss_sum, means.correct = float(sums["loss_sum"]), int(sums["correct"])
            means.total = int(sums["total"])
        return means

    def sums(self) -> dict:
        return {"loss_sum": self.loss_sum, "correct": self.correct, "total": self.total}

    def add(self, loss: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        self.pending.append({"loss": loss, "correct": correct, "n": n})

    def read(self, steps: list[dict]) -> list[dict]:
        """Fold the pending batches in; ``steps`` come back as floats, read in the same copy."""
        rows = read_floats(self.pending + steps)
        for row in rows[: len(self.pending)]:
            self.loss_sum += row["loss"] * row["n"]
            self.correct += int(row["correct"])
            self.total += row["n"]
            self.seen += row["n"]
        self.pending = []
        return rows[len(rows) - len(steps) :]


def _plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax1.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss (train: with label smoothing / mixup)")
    ax2.plot(epochs, [r["train_acc"] for r in history], "o-", label="train")
    ax2.plot(epochs, [r["val_acc"] for r in history], "o-", label="validation")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def train(cfg: VisionTrainConfig | None = None, resume: str | None = None, **overrides) -> dict:
    """Train and return the best and final validation accuracy and the checkpoint path.
    ``overrides`` are ``VisionTrainConfig`` fields (an unknown name is an error naming the close
    ones); with ``resume`` (an output directory or its ``last.pth``) the saved settings are used,
    and only those that keep the run exact may be overridden (``epochs``, ``max_steps``, ...)."""
    overrides = canonical(VisionTrainConfig, overrides, VisionTrainConfig.WHAT)
    if resume is not None:
        ckpt_path = Path(resume) / "last.pth" if Path(resume).is_dir() else Path(resume)
        if cfg is None:
            cfg = VisionTrainConfig.from_dict(load_training_checkpoint(ckpt_path)["config"])
            cfg.out = str(ckpt_path.parent)
        check_resume_overrides(cfg, overrides, RESUME_FIXED)
    cfg = replace(cfg or VisionTrainConfig(), **overrides)
    trainer = VisionTrainer(cfg)
    if resume is not None:
        trainer.resume(resume)
    result = trainer.fit()
    if trainer.world > 1:
        close_distributed()
    return result
