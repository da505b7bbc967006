"""``esh train``: train a vision model."""

from __future__ import annotations

import argparse
import os

from esh.cli._common import add_amp_arguments, parse_model_args

_TRAIN_FLAGS = {
    # flag: (type, help); defaults live in TrainConfig, so that --resume keeps the saved ones
    "model": (str, "model name (default: mambavision_nano, esh's CPU-sized hybrid)"),
    "data": (str, "'digits' (embedded MNIST-5k), DIR with train/ and val/, FILE.npz, or hf:NAME"),
    "epochs": (int, "epochs (default 8)"),
    "batch_size": (int, "batch size (default 64)"),
    "lr": (float, "peak learning rate (default 3e-3)"),
    "weight_decay": (float, "weight decay (default 0.05)"),
    "optimizer": (str, "timm optimizer: adamw, lamb, sgd, ... (default adamw)"),
    "warmup_epochs": (float, "linear warm-up epochs before the cosine decay (default 1)"),
    "img_size": (int, "input size (default: the model's)"),
    "num_classes": (int, "default: the number of classes in the data"),
    "checkpoint": (str, "initial weights"),
    "out": (str, "output directory (default runs/train)"),
    "device": (str, "cpu, cuda, cuda:1, mps"),
    "seed": (int, "seed for everything (default 0)"),
    "workers": (int, "data-loading processes (default 0)"),
    "log": (str, "csv (always written), tensorboard or wandb"),
    "grad_accum": (int, "gradient accumulation steps"),
    "clip_grad": (float, "gradient-norm clipping (default 5; 0 disables)"),
    "label_smoothing": (float, "default 0.1"),
    "mixup": (float, "mixup alpha (default 0: off)"),
    "cutmix": (float, "cutmix alpha (default 0: off)"),
    "ema_decay": (float, "model EMA decay, with --ema"),
    "randaug": (str, "RandAugment policy, e.g. rand-m9-mstd0.5"),
    "hflip": (float, "horizontal-flip probability (default 0: digits are not symmetric)"),
    "color_jitter": (float, "colour jitter strength"),
    "re_prob": (float, "random-erasing probability"),
    "max_steps": (int, "stop after this many optimizer steps"),
    "save_every": (int, "also checkpoint every N optimizer steps"),
    "log_interval": (int, "write steps.csv and refresh the progress bar every N optimizer steps (default 10)"),
}


_TRAIN_SWITCHES = {
    "ema": "keep an EMA of the weights and validate it too",
    "grad_checkpointing": "recompute blocks in the backward to save memory (default: the model's choice)",
    "channels_last": "channels-last memory format",
    "compile": "torch.compile the model",
}


def _cmd_train(args: argparse.Namespace) -> int:
    from esh.train import TrainConfig, train

    # only what was given on the command line: the rest keeps TrainConfig's (or, with
    # --resume, the saved run's) values; `0` is a value (e.g. --clip-grad 0), not "unset"
    overrides = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    overrides.update({k: True for k in _TRAIN_SWITCHES if getattr(args, k)})
    if args.amp:
        overrides["amp"] = True
    if args.amp_dtype is not None:
        overrides["amp_dtype"] = args.amp_dtype
    if args.augment is False:
        overrides["augment"] = False
    if args.no_grad_checkpointing:
        overrides["grad_checkpointing"] = False
    model_kwargs = parse_model_args(args.model_arg or [])
    if args.ponder_warmup is not None:
        model_kwargs["ponder_warmup_steps"] = args.ponder_warmup
    if model_kwargs:
        overrides["model_kwargs"] = model_kwargs
    if args.smoke_test:
        overrides.setdefault("epochs", 1)
        overrides.setdefault("max_steps", 20)
    result = train(resume=args.resume, **overrides) if args.resume else train(TrainConfig(**overrides))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only the first process reports
        return 0
    print(
        f"best validation accuracy {result['best_val_acc']:.2f}%, final {result['final_val_acc']:.2f}%; "
        f"checkpoint {result['checkpoint']} (outputs in {result['out']})"
    )
    return 0


def add_parsers(sub) -> None:
    train = sub.add_parser("train", help="train a model (default: esh's hybrid on the embedded digits)")
    for name, (kind, text) in _TRAIN_FLAGS.items():
        train.add_argument("--" + name.replace("_", "-"), type=kind, help=text)
    for name, text in _TRAIN_SWITCHES.items():
        train.add_argument("--" + name.replace("_", "-"), action="store_true", help=text)
    add_amp_arguments(train, "mixed-precision training")
    train.add_argument(
        "--no-aug", dest="augment", action="store_false", default=None, help="train on the evaluation transform"
    )
    train.add_argument(
        "--no-grad-checkpointing", action="store_true", help="never recompute blocks (ESH-Vision does by default)"
    )
    train.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="extra model-builder argument, repeatable (e.g. drop_path_rate=0.1)",
    )
    train.add_argument(
        "--ponder-warmup",
        type=int,
        help="ESH models: optimizer steps before the ponder cost enters the loss (the model's default: 15000)",
    )
    train.add_argument("--resume", help="an output directory (or its last.pth) to continue exactly")
    train.add_argument("--smoke-test", action="store_true", help="one epoch of at most 20 steps")
    train.set_defaults(func=_cmd_train)
