"""``esh train``: train a vision model. Its options are ``VisionTrainConfig``'s fields."""

from __future__ import annotations

import argparse
import os

from esh.cli._common import add_amp_arguments, amp_overrides, parse_model_args
from esh.cli._config_args import add_config_arguments, given
from esh.train.trainer import VisionTrainConfig

_FIELDS: list[str] = []


def _cmd_train(args: argparse.Namespace) -> int:
    import esh.train

    # only what was given on the command line: the rest keeps VisionTrainConfig's (or, with
    # --resume, the saved run's) values
    overrides = given(args, _FIELDS)
    overrides.update(amp_overrides(args))
    model_kwargs = parse_model_args(args.model_arg or [])
    if model_kwargs:
        overrides["model_kwargs"] = model_kwargs
    if args.smoke_test:
        overrides.setdefault("epochs", 1)
        overrides.setdefault("max_steps", 20)
    result = esh.train.train(resume=args.resume, **overrides)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only the first process reports
        return 0
    print(
        f"best validation accuracy {result['best_val_acc']:.2f}%, final {result['final_val_acc']:.2f}%; "
        f"checkpoint {result['checkpoint']} (outputs in {result['out']})"
    )
    return 0


def add_parsers(sub) -> None:
    train = sub.add_parser("train", help="train a model (default: esh's hybrid on the embedded digits)")
    # --aug/--no-aug: the short form of --augment/--no-augment
    _FIELDS[:] = add_config_arguments(train, VisionTrainConfig, aliases={"augment": ["--aug"]})
    add_amp_arguments(train, "mixed-precision training")
    train.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="extra model-builder argument, repeatable (e.g. drop_path_rate=0.1)",
    )
    train.add_argument("--resume", help="an output directory (or its last.pth) to continue exactly")
    train.add_argument("--smoke-test", action="store_true", help="one epoch of at most 20 steps")
    train.set_defaults(func=_cmd_train)
