"""The ``esh lm train`` and ``esh lm generate`` jobs, callable from Python the same way.

``train_lm()`` with no arguments trains the tiny byte-level ESH LM on the bundled Shakespeare
corpus for a few CPU minutes and leaves in ``out`` a directory that holds everything needed to
use or continue it: ``config.json`` + ``model.safetensors`` (``ESHModel.from_pretrained``), the
tokenizer (``esh.data.tokenizer.load_tokenizer``), ``last.pth`` (optimizer, RNG and data
position for ``resume=``), ``lm_job.json`` (the data and tokenizer it was trained with),
``steps.csv`` and ``metrics.csv``. ``generate_text(checkpoint, prompt)`` loads such a directory
and continues a prompt.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from esh._io import write_text
from esh.data.text import ContiguousBlockDataset, LMData, RandomBlockDataset, prepare_lm_data
from esh.data.tokenizer import load_tokenizer
from esh.devices import resolve_device
from esh.errors import InputError
from esh.train.checkpoint import load_training_checkpoint
from esh.train.distributed import close_distributed
from esh.train.lm import CHECKPOINT_FILE, LMTrainConfig, LMTrainer
from esh.train.lock import OutputLock
from esh.train.settings import canonical, check_int, check_resume_overrides

JOB_FILE = "lm_job.json"
CONFIGS = ("tiny", "small", "medium", "large")
# the no-argument run: a few minutes on two CPU cores
DEFAULTS = dict(
    lr=1e-3,
    min_lr=1e-4,
    warmup_steps=30,
    max_steps=300,
    batch_size=16,
    block_size=128,
    betas=(0.9, 0.99),
    eval_interval=100,
    eval_iters=16,
    out="runs/lm",
)
SMOKE_TEST = dict(max_steps=4, warmup_steps=1, batch_size=2, block_size=32, eval_interval=0, eval_iters=2)
# what an exact resume cannot change: the data it reads and the order it reads them in
RESUME_FIXED = ("batch_size", "block_size", "grad_accum", "seed")


def _check_config(name: str) -> None:
    if name not in CONFIGS:
        raise InputError(f"--config must be one of {', '.join(CONFIGS)}; got {name!r}")


def model_config(name: str, vocab_size: int, block_size: int, **overrides):
    """The ESHConfig of ``--config NAME`` for a tokenizer of ``vocab_size`` ids."""
    from esh.models import esh_lm

    _check_config(name)
    builder = getattr(esh_lm, f"esh_{name}")
    return builder(vocab_size=vocab_size, max_seq_len=max(block_size + 1, 256), **overrides)


def _loaders(data: LMData, cfg: LMTrainConfig, workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """Random training windows (one "epoch" = one pass over the training tokens in expectation)
    and contiguous evaluation windows; under torchrun each process reads its own share. On CUDA
    the batches come in pinned memory (their copies to the GPU overlap the computation)."""
    train_set = RandomBlockDataset(data.train, cfg.block_size, seed=cfg.seed)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sampler = None
    if world > 1:
        sampler = DistributedSampler(train_set, world, int(os.environ.get("RANK", "0")), shuffle=False)
    pin = resolve_device(cfg.device).type == "cuda"
    train = DataLoader(train_set, cfg.batch_size, sampler=sampler, num_workers=workers, drop_last=True, pin_memory=pin)
    val = DataLoader(
        ContiguousBlockDataset(data.val, cfg.block_size), cfg.batch_size, num_workers=workers, pin_memory=pin
    )
    return train, val


def _check_job(sample_tokens: object, prompt: object, workers: object) -> None:
    check_int("sample_tokens", sample_tokens, 0)
    check_int("workers", workers, 0)
    if sample_tokens and not (isinstance(prompt, str) and prompt):
        raise InputError("the prompt of the sample is empty: give at least one character (or --sample-tokens 0)")


def train_lm(
    config: str = "tiny",
    data: str = "shakespeare",
    tokenizer: str = "byte",
    resume: str | None = None,
    sample_tokens: int = 200,
    prompt: str = "\n",
    text_column: str | None = None,
    workers: int = 0,
    **training: object,
) -> dict:
    """Train an ESH LM and return the final evaluation, a generated sample and the output
    directory. ``training`` overrides ``LMTrainConfig`` fields (``max_steps``, ``batch_size``,
    ``block_size``, ``lr``, ``amp``, ``amp_dtype``, ``grad_checkpointing``, ``out``, ... or
    their older names); ``resume`` is an output directory to continue exactly (its own settings
    are used, the overrides on top, except those that change the data it reads). Every setting
    is checked before anything is read or trained; the trained model is saved before the sample
    is generated."""
    from esh.models.esh_lm import ESHConfig, ESHModel

    _check_job(sample_tokens, prompt, workers)
    training = canonical(LMTrainConfig, training, LMTrainConfig.WHAT)
    if resume is not None:
        run_dir = Path(resume)
        job_path = run_dir / JOB_FILE
        if not job_path.is_file():
            raise InputError(f"--resume {resume}: no {JOB_FILE} there (not an `esh lm train` output directory)")
        job = json.loads(job_path.read_text())
        saved = LMTrainConfig.from_dict(load_training_checkpoint(run_dir / CHECKPOINT_FILE)["config"])
        check_resume_overrides(saved, training, RESUME_FIXED)
        cfg = replace(saved, **{**training, "out": str(run_dir)})
        model_cfg = ESHConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    else:
        cfg = LMTrainConfig(**{**DEFAULTS, **training})
        _check_config(config)
        model_cfg = None
    resolve_device(cfg.device)  # a device this machine lacks fails before the data is read
    if model_cfg is not None and cfg.block_size >= model_cfg.max_seq_len:
        raise InputError(
            f"block_size {cfg.block_size} does not fit the model: its max_seq_len is {model_cfg.max_seq_len} "
            f"(at most {model_cfg.max_seq_len - 1})"
        )
    out = Path(cfg.out) if cfg.out else None
    lead = int(os.environ.get("RANK", "0")) == 0
    lock = OutputLock(out) if out is not None and lead else None
    if lock is not None:
        lock.acquire()
    try:
        if resume is not None:
            tok = load_tokenizer(run_dir)
            lm_data = prepare_lm_data(job["data"], tok, job["val_fraction"], job.get("text_column"))
            model = ESHModel(model_cfg)
        else:
            lm_data = prepare_lm_data(data, tokenizer, 0.1, text_column)
            tok = lm_data.tokenizer
            torch.manual_seed(cfg.seed)
            model = ESHModel(model_config(config, tok.vocab_size, cfg.block_size))
            job = {"config": config, "data": str(data), "tokenizer": tokenizer, "val_fraction": 0.1}
            if text_column:
                job["text_column"] = text_column
        cfg.eval_bytes_per_token = lm_data.val_bytes_per_token
        cfg.eval_chars_per_token = lm_data.val_chars_per_token
        train_loader, val_loader = _loaders(lm_data, cfg, workers)
        trainer = LMTrainer(model, train_loader, cfg, val_loader)
        if out is not None and trainer.lead:
            out.mkdir(parents=True, exist_ok=True)
            tok.save(out)
            write_text(out / JOB_FILE, json.dumps({**job, "training": asdict(cfg)}, indent=2))
        if resume is not None:
            trainer.load_checkpoint(Path(resume))
        result = trainer.train()  # saves the model at its last step
    finally:
        if lock is not None:
            lock.release()
    if trainer.world > 1:
        close_distributed()
    sample = ""
    if sample_tokens and trainer.lead:
        sample = generate_with(model, tok, prompt, sample_tokens, temperature=0.8, top_k=40, seed=cfg.seed)
    return {
        **result,
        "sample": sample,
        "out": str(out) if out else None,
        "parameters": model.num_parameters(),
        "tokenizer": f"{tok.kind} ({tok.vocab_size} ids)",
    }


def generate_with(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> str:
    """The prompt followed by up to ``max_new_tokens`` generated tokens, decoded."""
    if not prompt:
        raise InputError("the prompt is empty: give at least one character")
    ids = tokenizer.encode_tensor(prompt)
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(
        ids[None].to(device),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        use_cache=use_cache,
        eos_token_id=tokenizer.eos_token_id,
        generator=generator,
    )
    return tokenizer.decode(out[0].tolist())


def load_lm(checkpoint: str | os.PathLike, device: str = "cpu"):
    """(model, tokenizer) from an ``esh lm train`` output directory."""
    from esh.models.esh_lm import ESHModel

    device = resolve_device(device)
    path = Path(checkpoint)
    if not path.is_dir():
        raise InputError(f"--checkpoint {checkpoint}: expected the output directory of `esh lm train`")
    tokenizer = load_tokenizer(path)
    model = ESHModel.from_pretrained(path, map_location=device)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise InputError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} ids, the model only {model.config.vocab_size}"
        )
    return model.eval(), tokenizer


def generate_text(
    checkpoint: str | os.PathLike,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    device: str = "cpu",
) -> str:
    """Load ``checkpoint`` and continue ``prompt`` (greedy at temperature 0)."""
    model, tokenizer = load_lm(checkpoint, device)
    return generate_with(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed)
