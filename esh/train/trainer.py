"""One trainer for every esh vision model and any timm model.

Built from timm's pieces (optimizers, cosine schedule with warm-up stepped per update,
label-smoothing and mixup losses, model EMA, transforms). A model may contribute its own
loss terms: if it has ``auxiliary_losses(step)``, the trainer calls it after each forward with
the number of optimizer steps done so far; every returned entry whose name starts with ``loss``
is added to the objective, the others are only logged, per step, in ``steps.csv`` and the
progress bar (the ESH models use this for the ponder cost schedule and routing statistics).
A model whose class sets ``default_grad_checkpointing = True`` is trained with block-level
gradient checkpointing unless ``grad_checkpointing=False`` is given.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from esh._compat import import_timm, require
from esh.data.datasets import build_datasets, collate_check
from esh.errors import InputError
from esh.models import create_model
from esh.models._checkpoint import CheckpointError
from esh.train.checkpoint import atomic_save, load_training_checkpoint, rng_state, set_rng_state
from esh.train.distributed import close_distributed, init_distributed, wrap_ddp
from esh.train.logs import MetricsLog, StepLog, read_floats
from esh.train.precision import amp_dtype_for, autocast, enable_tf32, grad_scaler

DEFAULT_MODEL = "mambavision_nano"


@dataclass
class TrainConfig:
    model: str = DEFAULT_MODEL
    data: str = "digits"
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5
    img_size: int | None = None
    num_classes: int | None = None
    checkpoint: str | None = None  # initial weights
    amp: bool = False
    amp_dtype: str | None = None  # bfloat16 or float16; None: bfloat16 on CPU and GPUs that have it
    grad_accum: int = 1
    clip_grad: float | None = 5.0
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    ema: bool = False
    ema_decay: float = 0.999
    grad_checkpointing: bool | None = None  # None: the model's default_grad_checkpointing (else off)
    model_kwargs: dict = field(default_factory=dict)  # extra builder arguments, e.g. ponder_warmup_steps
    channels_last: bool = False
    compile: bool = False
    randaug: str | None = None  # e.g. "rand-m9-mstd0.5"
    hflip: float = 0.0
    color_jitter: float = 0.0
    re_prob: float = 0.0
    augment: bool = True  # False: train on the evaluation transform (deterministic inputs)
    seed: int = 0
    workers: int = 0
    device: str = "cpu"
    out: str = "runs/train"
    log: str = "csv"
    log_interval: int = 10  # read losses from the device, write steps.csv, refresh the bar every N steps
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests)
    save_every: int = 0  # also checkpoint every N optimizer steps (0: at epoch ends only)
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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


def _build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """An esh model by name, or any timm model."""
    from esh.models import is_model

    if is_model(cfg.model):
        return create_model(cfg.model, checkpoint_path=cfg.checkpoint, num_classes=num_classes, **cfg.model_kwargs)
    timm = import_timm()
    if not timm.is_model(cfg.model):
        raise InputError(f"unknown model {cfg.model!r}: not in esh.list_models() nor timm.list_models()")
    kwargs = dict(num_classes=num_classes, checkpoint_path=cfg.checkpoint or "", **cfg.model_kwargs)
    if cfg.img_size:
        try:  # models with position embeddings are built for the size; the others take no img_size
            return timm.create_model(cfg.model, img_size=cfg.img_size, **kwargs)
        except TypeError:
            pass
    return timm.create_model(cfg.model, **kwargs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _transforms(model: nn.Module, cfg: TrainConfig):
    timm = import_timm()
    data_cfg = timm.data.resolve_data_config(model=model)
    size = cfg.img_size or data_cfg["input_size"][-1]
    common = dict(
        input_size=(3, size, size), interpolation=data_cfg["interpolation"], mean=data_cfg["mean"], std=data_cfg["std"]
    )
    train = timm.data.create_transform(
        **common,
        is_training=True,
        scale=(0.8, 1.0),
        hflip=cfg.hflip,
        auto_augment=cfg.randaug,
        color_jitter=cfg.color_jitter,
        re_prob=cfg.re_prob,
    )
    val = timm.data.create_transform(**common, is_training=False, crop_pct=1.0)
    return (train if cfg.augment else val), val


class Trainer:
    def __init__(self, cfg: TrainConfig):
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
        checkpointing = cfg.grad_checkpointing
        if checkpointing is None:
            checkpointing = bool(getattr(self.model, "default_grad_checkpointing", False))
        if checkpointing and hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(True)
        self.train_set.transform, self.val_set.transform = _transforms(self.model, cfg)
        if cfg.batch_size % self.world:
            raise InputError(
                f"--batch-size {cfg.batch_size} (the global batch) must divide by the {self.world} processes"
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
        import_timm()
        import timm.loss
        import timm.optim
        import timm.scheduler
        import timm.utils

        opt_name = cfg.optimizer
        if opt_name in ("adamw8bit", "adam8bit"):  # bitsandbytes, an optional extra
            require("bitsandbytes", "bnb", f"--optimizer {opt_name}")
            opt_name = "bnb" + opt_name
        self.optimizer = timm.optim.create_optimizer_v2(self.model, opt_name, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
        self.epoch = self.step_in_epoch = self.global_step = 0
        self.best_acc, self.history = -1.0, []
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
            "best_acc": self.best_acc,
            "history": self.history,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "config": asdict(self.cfg),
        }

    def save(self, name: str = "last.pth") -> Path:
        path = self.out / name
        atomic_save(self.state(), path)
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
        except RuntimeError as e:
            raise CheckpointError(
                f"{path} does not fit {self.cfg.model} with {self.num_classes} classes: {e}"
            ) from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.module.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"], self.device)
        self.epoch, self.step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
        self.global_step, self.best_acc, self.history = ckpt["global_step"], ckpt["best_acc"], list(ckpt["history"])

    # --- loops --------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The objective, and the model's statistics to log (left on the device: see logs.py)."""
        loss = self.criterion(logits.float(), targets)
        logged = {}
        aux_fn = getattr(self.model, "auxiliary_losses", None)
        if callable(aux_fn):
            for name, value in aux_fn(self.global_step).items():
                if name.startswith("loss"):
                    loss = loss + value
                logged[name] = value.detach() if torch.is_tensor(value) else float(value)
        return loss, logged

    def train_epoch(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.model.train()
        self.sampler.epoch, self.sampler.skip = self.epoch, self.step_in_epoch * cfg.grad_accum
        means = _RunningMeans()
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
            with self.autocast():
                logits = self.forward_model(images)
            loss, logged = self._loss(logits, targets)
            self.scaler.scale(loss / cfg.grad_accum).backward()
            micro += 1
            means.add(loss.detach(), (logits.argmax(-1) == hard_targets).sum(), len(images))
            if micro % cfg.grad_accum:
                continue
            if cfg.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.model, step=self.global_step)
            self.global_step += 1
            self.step_in_epoch += 1
            self.scheduler.step_update(num_updates=self.global_step)
            lr = self.optimizer.param_groups[0]["lr"]
            steps.append({"step": self.global_step, "loss": loss.detach(), "lr": lr, **logged})
            bar.update(1)
            saving = cfg.save_every and self.global_step % cfg.save_every == 0 and self.rank == 0
            if saving or self.global_step % max(cfg.log_interval, 1) == 0:  # a checkpoint's steps are logged
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
            "images_per_s": means.total / max(seconds, 1e-9),
        }

    def _log_steps(self, steps: list[dict], means: _RunningMeans, bar, start: float) -> None:
        """Read the steps' values from the device (one wait), write them to steps.csv and show
        the epoch's running means."""
        rows = means.read(steps)
        steps.clear()
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
            img_s=f"{means.total / (time.perf_counter() - start):.0f}",
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
        cfg = self.cfg
        lead = self.rank == 0  # the first process validates, logs and checkpoints
        if lead:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        writer = MetricsLog(self.out, cfg.log) if lead else None
        self.step_log = StepLog(self.out / "steps.csv", self.global_step) if lead else None
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
        if writer is not None:
            writer.close()
            self.step_log.close()
        final = self.history[-1]["val_acc"] if self.history else float("nan")
        return {
            "best_val_acc": self.best_acc,
            "final_val_acc": final,
            "checkpoint": str(self.out / "best.pth"),
            "out": str(self.out),
        }

    def _end_of_epoch(self, row: dict, writer: MetricsLog) -> None:
        row.update(self.validate())
        if self.ema is not None:
            row["val_acc_ema"] = self.validate(self.ema.module)["val_acc"]
        self.history.append(row)
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
    together with the step-log rows (see ``read_floats``)."""

    def __init__(self):
        self.loss_sum, self.correct, self.total = 0.0, 0, 0
        self.pending: list[dict] = []

    def add(self, loss: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        self.pending.append({"loss": loss, "correct": correct, "n": n})

    def read(self, steps: list[dict]) -> list[dict]:
        """Fold the pending batches in; ``steps`` come back as floats, read in the same copy."""
        rows = read_floats(self.pending + steps)
        for row in rows[: len(self.pending)]:
            self.loss_sum += row["loss"] * row["n"]
            self.correct += int(row["correct"])
            self.total += row["n"]
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
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def train(cfg: TrainConfig | None = None, resume: str | None = None, **overrides) -> dict:
    """Train and return the best and final validation accuracy and the checkpoint path."""
    if resume is not None:
        ckpt_path = Path(resume) / "last.pth" if Path(resume).is_dir() else Path(resume)
        if cfg is None:
            cfg = TrainConfig.from_dict(load_training_checkpoint(ckpt_path)["config"])
            cfg.out = str(ckpt_path.parent)
    cfg = cfg or TrainConfig()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    trainer = Trainer(cfg)
    if resume is not None:
        trainer.resume(resume)
    result = trainer.fit()
    if trainer.world > 1:
        close_distributed()
    return result
