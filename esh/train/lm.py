"""The language-model trainer: ``LMTrainer(model, train_dataloader, config).train()``.

Works with any causal LM that follows the ESH LM contract — ``model(input_ids, labels=ids)``
returns an object with ``loss`` (the objective: next-token cross-entropy plus the model's
weighted auxiliary losses), ``ce_loss``, and optionally ``aux_loss``, ``alphas`` (per-layer
(B, T) router values) and ``moe_stats`` (a dict of floats) — so ``ESHModel``, the pure Mamba
LM and the GPT baseline train the same way.

A batch is a LongTensor (B, T) of token ids (labels = the ids; the model shifts them) or a
dict with ``input_ids`` and optionally ``labels`` (``-100`` = ignored).

What it does, nanoGPT's recipe made resumable: AdamW with weight decay on matrices and
embeddings only (never on biases, norms, Mamba's ``A_log`` and ``D``: ``esh.train.step``),
linear warm-up then cosine decay to ``min_lr`` per optimizer step, autocast (``amp``,
``amp_dtype``), gradient checkpointing (``grad_checkpointing``), accumulation, clipping,
evaluation of the held-out split (loss in nats per token, bits per token, and per byte / per
character when the config gives bytes / characters per token), atomic checkpoints
(``last.pth``, plus the model's ``save_pretrained`` files when it has them) and exact resume:
weights, optimizer, step, every RNG and the position in the data, so N steps in one go equal k
steps, a resume, and N − k steps. Training stops at the first non-finite loss, before any
checkpoint of it. Under ``torchrun`` the model is wrapped in DDP (or FSDP2 with
``distributed="fsdp"``); every process reads its own data loader, rank 0 evaluates, logs and
saves. Per-step statistics go to ``steps.csv``, evaluations to ``metrics.csv`` (and
TensorBoard or wandb with ``log=``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from esh._io import clean_stale_temps
from esh.errors import InputError
from esh.models._checkpoint import CheckpointError
from esh.train.checkpoint import load_training_checkpoint, rng_state, save_torch, seed_everything, set_rng_state
from esh.train.distributed import init_distributed, wrap_ddp, wrap_fsdp
from esh.train.lock import OutputLock
from esh.train.logs import LOG_KINDS, MetricsLog, StepLog, check_finite, read_floats
from esh.train.precision import AMP_DTYPES, amp_dtype_for, autocast, enable_tf32, grad_scaler
from esh.train.settings import check_float, check_int, config_from_dict, setting, with_aliases
from esh.train.step import OptimizerStep, auxiliary_loss, fused_options, param_groups

CHECKPOINT_FILE = "last.pth"


@with_aliases
@dataclass
class LMTrainConfig:
    """Hyper-parameters of ``LMTrainer`` (and the options of ``esh lm train``). Defaults follow
    nanoGPT; ``batch_size`` and ``block_size`` are what ``esh lm train`` builds its data loaders
    with (the trainer itself reads whatever the loader yields). Steps are optimizer steps.

    The names are the vision trainer's; the older ones are accepted everywhere (constructor,
    ``from_dict``, attributes): ``num_epochs`` (``epochs``), ``gradient_accumulation_steps``
    (``grad_accum``), ``grad_clip`` (``clip_grad``), ``use_amp`` (``amp``), ``use_checkpoint``
    (``grad_checkpointing``), ``out_dir`` (``out``)."""

    WHAT: ClassVar[str] = "LM training"
    ALIASES: ClassVar[dict[str, str]] = {
        "num_epochs": "epochs",
        "gradient_accumulation_steps": "grad_accum",
        "grad_clip": "clip_grad",
        "use_amp": "amp",
        "use_checkpoint": "grad_checkpointing",
        "out_dir": "out",
    }

    lr: float = setting(3e-4, "peak learning rate (cosine decay to min_lr)")
    min_lr: float | None = setting(None, "end of the cosine decay (lr / 10 when not given)")
    warmup_steps: int = setting(100, "linear warm-up steps")
    max_steps: int | None = setting(None, "optimizer steps (when not given: epochs passes over the data)")
    epochs: int = setting(1, "passes over the training data, when max_steps is not given")
    batch_size: int = setting(12, "sequences per process and micro-batch")
    block_size: int = setting(256, "tokens per sequence")
    weight_decay: float = setting(0.1, "AdamW weight decay (on matrices and embeddings only)")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas")
    clip_grad: float | None = setting(1.0, "max global gradient norm (0: no clipping)")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    amp: bool = setting(False, "mixed precision (autocast)", cli=False)
    amp_dtype: str | None = setting(None, "bfloat16 or float16 (float16 with a gradient scaler on CUDA)", cli=False)
    grad_checkpointing: bool = setting(False, "recompute blocks in the backward (model.set_grad_checkpointing)")
    eval_interval: int = setting(250, "evaluate every N steps, and at the end (0: only at the end)")
    eval_iters: int | None = setting(100, "evaluation batches (None: the whole evaluation loader)")
    log_interval: int = setting(10, "read the step statistics, log them, refresh the bar every N steps")
    out: str | None = setting("runs/lm", "output directory (None: write nothing)")
    save_every: int = setting(0, "also checkpoint every N steps (always at evaluations and the end)")
    seed: int = setting(1337, "seed for everything")
    device: str = setting("auto", "auto (CUDA when there is one), cpu, cuda, cuda:N, mps")
    log: str = setting("csv", "csv (always written), tensorboard or wandb")
    progress: bool = setting(True, "progress bar", cli=False)
    distributed: str = setting("ddp", "under torchrun: ddp or fsdp")
    eval_bytes_per_token: float | None = setting(None, "UTF-8 bytes per token of the evaluation split", cli=False)
    eval_chars_per_token: float | None = setting(None, "characters per token of the evaluation split", cli=False)

    def __post_init__(self) -> None:
        check_float("lr", self.lr, 0.0, low_open=True)
        check_float("min_lr", self.min_lr, 0.0, optional=True)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("max_steps", self.max_steps, 1, optional=True)
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("block_size", self.block_size, 1)
        check_float("weight_decay", self.weight_decay, 0.0)
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise InputError(f"betas must be two numbers in [0, 1); got {self.betas!r}")
        check_float("clip_grad", self.clip_grad, 0.0, optional=True)
        check_int("grad_accum", self.grad_accum, 1, what=" (gradient_accumulation_steps)")
        if self.amp_dtype is not None and self.amp_dtype not in AMP_DTYPES:
            raise InputError(f"amp_dtype must be 'bfloat16' or 'float16'; got {self.amp_dtype!r}")
        check_int("eval_interval", self.eval_interval, 0)
        check_int("eval_iters", self.eval_iters, 1, optional=True)
        check_int("log_interval", self.log_interval, 1)
        check_int("save_every", self.save_every, 0)
        check_int("seed", self.seed, 0)
        if self.log not in LOG_KINDS:
            raise InputError(f"log must be one of {', '.join(LOG_KINDS)}; got {self.log!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise InputError(f"distributed must be 'ddp' or 'fsdp'; got {self.distributed!r}")
        check_float("eval_bytes_per_token", self.eval_bytes_per_token, 0.0, low_open=True, optional=True)
        check_float("eval_chars_per_token", self.eval_chars_per_token, 0.0, low_open=True, optional=True)

    @classmethod
    def from_dict(cls, d: dict) -> LMTrainConfig:
        """From a saved config (older names accepted); unknown keys are an error naming the close matches."""
        return config_from_dict(cls, d)


def cosine_lr(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """nanoGPT's schedule: linear warm-up to ``lr`` over ``warmup_steps``, cosine decay to
    ``min_lr`` at ``decay_steps``, ``min_lr`` after. ``step`` counts from 0."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def _split_batch(batch) -> tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        if "input_ids" not in batch:
            raise InputError(f"a dict batch needs 'input_ids'; got keys {sorted(batch)}")
        ids = batch["input_ids"]
        labels = batch.get("labels", ids)
    elif torch.is_tensor(batch):
        ids = labels = batch
    else:
        raise InputError(
            f"expected batches of token ids: a LongTensor (B, T) or a dict with input_ids[, labels]; got {type(batch)}"
        )
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be an integer tensor (B, T); got {ids.dtype} {tuple(ids.shape)}")
    return ids.long(), labels.long()


def _generators(loader) -> list[torch.Generator]:
    """The torch generators that decide a loader's order (its own, its sampler's)."""
    found: list[torch.Generator] = []
    for owner in (
        loader,
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


def _set_epoch(loader, epoch: int) -> None:
    for owner in (getattr(loader, "dataset", None), getattr(loader, "sampler", None)):
        if callable(getattr(owner, "set_epoch", None)):
            owner.set_epoch(epoch)


class LMTrainer:
    """Train a causal LM. ``train()`` returns the last evaluation (``val_loss`` in nats per
    token, ``val_bits_per_token``, ``val_bpb`` / ``val_bpc`` when the config gives the ratios)
    and the steps done; ``evaluate()`` scores the evaluation loader alone."""

    def __init__(
        self,
        model: nn.Module,
        train_dataloader,
        config: LMTrainConfig | None = None,
        eval_dataloader=None,
    ):
        self.config = cfg = config or LMTrainConfig()
        setup = init_distributed(cfg.device)  # under torchrun: cuda:LOCAL_RANK, the process group
        self.device, self.rank, self.world = setup.device, setup.rank, setup.world
        self.lead = self.rank == 0
        seed_everything(cfg.seed)
        self.model = model.to(self.device)
        self.train_loader, self.eval_loader = train_dataloader, eval_dataloader
        if cfg.grad_checkpointing:
            if not callable(getattr(model, "set_grad_checkpointing", None)):
                raise InputError(f"grad_checkpointing=True but {type(model).__name__} has no set_grad_checkpointing()")
            model.set_grad_checkpointing(True)
        self.forward_model = self._wrap(model)
        self.optimizer = torch.optim.AdamW(
            param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, **fused_options("adamw", self.device)
        )
        self.amp_dtype = amp_dtype_for(self.device, cfg.amp_dtype)
        self.scaler = grad_scaler(self.device, cfg.amp, cfg.amp_dtype)
        self.stepper = OptimizerStep(
            model, self.forward_model, self.optimizer, self.scaler, cfg.grad_accum, cfg.clip_grad
        )
        enable_tf32(self.device)
        # the step statistics are summed over micro-batches on the device, in float64 like the
        # Python floats they replace (MPS has no float64)
        self._stat_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.total_steps = self._total_steps()
        self.min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
        self.out = Path(cfg.out) if cfg.out else None
        self.step = self.epoch = self.batches_in_epoch = 0
        self.epoch_rng: dict | None = None
        self.history: list[dict] = []
        self._iter: Iterator | None = None

    # --- setup ----------------------------------------------------------------------------
    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        if self.config.distributed == "fsdp":
            return wrap_fsdp(model)
        # (idle MoE experts still run, on zero tokens, so every parameter gets a gradient)
        return wrap_ddp(model, self.device)

    def _total_steps(self) -> int:
        cfg = self.config
        if cfg.max_steps is not None:
            return cfg.max_steps
        try:
            per_epoch = len(self.train_loader) // cfg.grad_accum
        except TypeError:
            raise InputError("the training loader has no length: set LMTrainConfig.max_steps") from None
        if per_epoch < 1:
            raise InputError(
                f"the training loader has {len(self.train_loader)} batches, fewer than grad_accum={cfg.grad_accum}"
            )
        return per_epoch * cfg.epochs

    def _autocast(self):
        return autocast(self.device, self.config.amp, self.config.amp_dtype)

    # --- data -----------------------------------------------------------------------------
    def _start_epoch(self, skip: int = 0) -> None:
        """A fresh iterator over the training loader for ``self.epoch``; the RNG state just
        before it is kept so a resumed run can rebuild the same iterator and skip ``skip``
        micro-batches."""
        _set_epoch(self.train_loader, self.epoch)
        if self.epoch_rng is None:
            self.epoch_rng = {
                "rng": rng_state(self.device),
                "loader": [g.get_state() for g in _generators(self.train_loader)],
            }
        self._iter = iter(self.train_loader)
        for _ in range(skip):
            next(self._iter)

    def _next_batch(self):
        if self._iter is None:
            self._start_epoch()
        try:
            batch = next(self._iter)
        except StopIteration:
            self.epoch, self.batches_in_epoch, self.epoch_rng = self.epoch + 1, 0, None
            self._start_epoch()
            try:
                batch = next(self._iter)
            except StopIteration:
                raise InputError("the training loader yields no batches") from None
        self.batches_in_epoch += 1
        return batch

    # --- checkpoints ----------------------------------------------------------------------
    def _model_state(self) -> dict:
        if self.world > 1 and self.config.distributed == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict()

    def _optim_state(self) -> dict:
        if self.world > 1 and self.config.distributed == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        return self.optimizer.state_dict()

    def state_dict(self) -> dict:
        return {
            "model": self._model_state(),
            "optimizer": self._optim_state(),
            "scaler": self.scaler.state_dict(),
            "config": asdict(self.config),
            "global_step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.batches_in_epoch,  # micro-batches of this epoch already consumed
            "epoch_rng": self.epoch_rng,
            "rng": rng_state(self.device),
            "history": self.history,
        }

    def save(self) -> Path | None:
        """Write ``last.pth`` atomically (and the model's own files, when it can save itself)."""
        if self.out is None:
            return None
        state = self.state_dict()  # every rank takes part in gathering FSDP shards
        if not self.lead:
            return None
        path = self.out / CHECKPOINT_FILE
        save_torch(state, path)
        fsdp = self.world > 1 and self.config.distributed == "fsdp"  # sharded parameters: last.pth only
        if callable(getattr(self.model, "save_pretrained", None)) and not fsdp:
            self.model.save_pretrained(self.out)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue exactly where the run that wrote ``path`` (``last.pth`` or its directory) stopped."""
        path = Path(path)
        if path.is_dir():
            path = path / CHECKPOINT_FILE
        ckpt = load_training_checkpoint(path)
        try:
            if self.world > 1 and self.config.distributed == "fsdp":
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_model_state_dict,
                    set_optimizer_state_dict,
                )

                opts = StateDictOptions(full_state_dict=True)
                set_model_state_dict(self.model, ckpt["model"], options=opts)
                set_optimizer_state_dict(self.model, self.optimizer, ckpt["optimizer"], options=opts)
            else:
                self.model.load_state_dict(ckpt["model"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{path} does not fit this model: {e}") from None
        try:
            self.scaler.load_state_dict(ckpt["scaler"])
            self.step, self.epoch = int(ckpt["global_step"]), ckpt["epoch"]
            self.batches_in_epoch = ckpt["step_in_epoch"]
            self.history = list(ckpt.get("history", []))
            self.epoch_rng = ckpt["epoch_rng"]
            if self.epoch_rng is not None:  # rebuild the data iterator exactly as it was
                set_rng_state(self.epoch_rng["rng"], self.device)
                for g, s in zip(_generators(self.train_loader), self.epoch_rng["loader"]):
                    g.set_state(s)
            rng = ckpt["rng"]
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{path} is a damaged esh training checkpoint ({type(e).__name__}: {e})") from None
        if self.epoch_rng is not None:
            self._start_epoch(skip=self.batches_in_epoch)
        set_rng_state(rng, self.device)

    # --- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, loader=None) -> dict[str, float]:
        """Mean next-token cross-entropy over the tokens of ``eval_iters`` batches of the
        evaluation loader, in nats per token, and in bits per token / byte / character."""
        loader = loader if loader is not None else self.eval_loader
        if loader is None:
            raise InputError("no evaluation loader: pass eval_dataloader= to Trainer")
        was_training = self.model.training
        self.model.eval()
        batches = []
        # a loader's iterator draws a seed from the global RNG: keep training's random stream as
        # it is, so that evaluating (or not) never changes what training does
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type), torch.no_grad():
            for i, batch in enumerate(loader):
                if self.config.eval_iters is not None and i >= self.config.eval_iters:
                    break
                ids, labels = _split_batch(batch)
                n = int((labels[:, 1:] != -100).sum())  # counted on the host, before the copy
                ids, labels = ids.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
                with self._autocast():
                    out = self.model(ids, labels=labels)
                batches.append({"ce_loss": out.ce_loss, "n": n})
        self.model.train(was_training)
        total, count = 0.0, 0
        for row in read_floats(batches):  # one wait for the device, after the last batch
            total += row["ce_loss"] * row["n"]
            count += row["n"]
        if count == 0:
            raise InputError("the evaluation loader yields no tokens to predict")
        loss = total / count
        result = {"val_loss": loss, "val_bits_per_token": loss / math.log(2), "val_tokens": count}
        if self.config.eval_bytes_per_token:
            result["val_bpb"] = loss / math.log(2) / self.config.eval_bytes_per_token
        if self.config.eval_chars_per_token:
            result["val_bpc"] = loss / math.log(2) / self.config.eval_chars_per_token
        return result

    # --- training -------------------------------------------------------------------------
    def _micro_step(self, batch, last: bool) -> tuple[dict, int]:
        """Forward and backward of one micro-batch; its statistics stay on the device."""
        ids, labels = _split_batch(batch)
        ids, labels = ids.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        with self.stepper.micro_batch(last):
            with self._autocast():
                out = self.forward_model(ids, labels=labels)
            if out.loss is None:
                raise InputError(f"{type(self.model).__name__} returned no loss for labels")
            self.stepper.backward(out.loss)
        stats = {"loss": out.loss}
        if getattr(out, "ce_loss", None) is not None:
            stats["ce_loss"] = out.ce_loss
        _, logged = auxiliary_loss(self.model, out, self.step)  # already in out.loss: logged only
        stats.update(logged)
        alphas = getattr(out, "alphas", None)
        if alphas:
            stats["alpha_mean"] = torch.stack([a.detach().float().mean() for a in alphas]).mean()
        moe_stats = getattr(out, "moe_stats", None) or {}
        # the ESH LM's statistics read as floats (a sync) unless taken as tensors
        stats.update(moe_stats.tensors() if callable(getattr(moe_stats, "tensors", None)) else moe_stats)
        stats = {k: v.detach().to(self._stat_dtype) if torch.is_tensor(v) else float(v) for k, v in stats.items()}
        return stats, ids.numel()

    def _optimizer_step(self) -> tuple[dict, int]:
        cfg = self.config
        lr = cosine_lr(self.step, cfg.lr, self.min_lr, cfg.warmup_steps, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums: dict = {}
        tokens = 0
        for micro in range(cfg.grad_accum):
            stats, n = self._micro_step(self._next_batch(), last=micro == cfg.grad_accum - 1)
            tokens += n
            for k, v in stats.items():
                v = v / cfg.grad_accum
                sums[k] = sums[k] + v if k in sums else v
        grad_norm = self.stepper.update()
        self.step += 1
        return {"lr": lr, "grad_norm": grad_norm, **sums}, tokens * self.world

    def _log_steps(self, pending: list[dict], step_log: StepLog | None, bar, last_eval: dict) -> dict:
        """Read the pending steps' statistics from the device (one wait), write them to
        steps.csv, show the last one; returns it."""
        rows = read_floats(pending)
        pending.clear()
        check_finite(rows)
        if step_log is not None:
            for row in rows:
                step_log.write(row)
        row = rows[-1]
        post = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{row['tokens_per_s']:.0f}"}
        if "alpha_mean" in row:
            post["alpha"] = f"{row['alpha_mean']:.3f}"
        if last_eval:
            post["val"] = f"{last_eval['val_loss']:.4f}"
        bar.set_postfix(post)
        return row

    def train(self, until: int | None = None) -> dict:
        """Run to ``total_steps`` optimizer steps (continuing after ``load_checkpoint``), or stop
        after step ``until`` with a checkpoint (the schedule still spans ``total_steps``)."""
        from tqdm.auto import tqdm

        cfg = self.config
        self.model.train()
        step_log = logger = None
        lock = OutputLock(self.out) if self.out is not None and self.lead else None
        if lock is not None:
            lock.acquire()
            try:
                clean_stale_temps(self.out)
                step_log = StepLog(self.out / "steps.csv", self.step)
                logger = MetricsLog(self.out, cfg.log, key="step")
            except BaseException:
                lock.release()
                raise
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            disable=not cfg.progress or not self.lead,
            dynamic_ncols=True,
        )
        last_eval: dict[str, float] = {}
        start, tokens_done = time.perf_counter(), 0
        stop = self.total_steps if until is None else min(until, self.total_steps)
        pending: list[dict] = []  # the steps' rows not yet read from the device
        try:
            while self.step < stop:
                row, tokens = self._optimizer_step()
                tokens_done += tokens
                pending.append({"step": self.step, **row, "tokens_per_s": tokens_done / (time.perf_counter() - start)})
                bar.update(1)
                at_end = self.step == stop
                evaluate = self.eval_loader is not None and (
                    at_end or (cfg.eval_interval and self.step % cfg.eval_interval == 0)
                )
                save = evaluate or at_end or (cfg.save_every and self.step % cfg.save_every == 0)
                # a checkpoint's steps are always logged; the device is read once per interval
                if save or self.step % cfg.log_interval == 0 or self.step == self.total_steps:
                    row = self._log_steps(pending, step_log, bar, last_eval)
                # under FSDP every forward gathers shards from all ranks: all of them evaluate
                fsdp = self.world > 1 and cfg.distributed == "fsdp"
                if evaluate and fsdp and not self.lead:
                    self.evaluate()
                if evaluate and self.lead:
                    try:
                        last_eval = self.evaluate()
                    except BaseException:
                        if save:  # the trained weights are kept whatever the evaluation does
                            self.save()
                        raise
                    entry = {
                        "step": self.step,
                        "train_loss": row["loss"],
                        **last_eval,
                        "elapsed_s": time.perf_counter() - start,
                    }
                    self.history.append(entry)
                    if logger is not None:
                        logger.write(entry)
                    bar.write(
                        f"step {self.step}: train loss {row['loss']:.4f}, "
                        f"val loss {last_eval['val_loss']:.4f} nats/token"
                        + (f", {last_eval['val_bpb']:.3f} bits/byte" if "val_bpb" in last_eval else "")
                    )
                if save:
                    self.save()
        finally:
            bar.close()
            if step_log is not None:
                step_log.close()
            if logger is not None:
                logger.close()
            if lock is not None:
                lock.release()
        return {"steps": self.step, "seconds": time.perf_counter() - start, **last_eval}
