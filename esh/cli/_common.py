"""What the ``esh`` commands share: how a command gets its model (one resolver), ``--device``,
``--amp``, ``KEY=VALUE`` model arguments."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from esh.errors import InputError


def load_model(args: argparse.Namespace):
    """The model a command was asked for (``esh.models.resolve.resolve_model``): ``--model``, or
    the one an ``esh train`` checkpoint records, with its classes, class names and input size."""
    from esh.models.resolve import resolve_model

    check_positive(args, "num_classes", "img_size")
    return resolve_model(
        args.model,
        checkpoint_path=args.checkpoint,
        pretrained=args.pretrained,
        num_classes=getattr(args, "num_classes", None),
        img_size=getattr(args, "img_size", None),
        **parse_model_args(getattr(args, "model_arg", None) or ()),
    )


def device(args: argparse.Namespace):
    """``--device`` read once for every command (``esh.devices.resolve_device``)."""
    from esh.devices import resolve_device

    return resolve_device(args.device)


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """An InputError naming the option when one of ``names`` was given as zero or less."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer; got {value}")


def add_device_argument(p: argparse.ArgumentParser, default: str = "cpu") -> None:
    p.add_argument("--device", default=default, help=f"cpu, cuda, cuda:N, mps or auto (default: {default})")


def add_amp_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--amp`` and ``--amp-dtype``: one meaning wherever a command runs a model."""
    parser.add_argument("--amp", action="store_true", help=f"{what} (autocast; see --amp-dtype)")
    parser.add_argument(
        "--amp-dtype",
        choices=("bfloat16", "float16"),
        help="with --amp (default: bfloat16 on CPU and on GPUs that have it, Ampere and newer; else float16, "
        "with a gradient scaler when training on CUDA)",
    )


def amp_overrides(args: argparse.Namespace) -> dict:
    """``--amp`` and ``--amp-dtype`` as training settings, only where given (so that ``--resume``
    keeps the saved run's)."""
    given = {"amp": True} if args.amp else {}
    if args.amp_dtype is not None:
        given["amp_dtype"] = args.amp_dtype
    return given


def parse_model_args(items: Sequence[str]) -> dict:
    """``KEY=VALUE`` pairs for the model builder; values are read as Python literals when they parse."""
    import ast

    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise InputError(f"--model-arg expects KEY=VALUE with KEY a Python name, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def add_model_arguments(p: argparse.ArgumentParser, runs: bool = True) -> None:
    """``--model``, ``--checkpoint``, ``--pretrained``, ``--num-classes``, ``--img-size``,
    ``--model-arg``, and for a command that runs the model (``runs``) ``--device`` and ``--amp``:
    how a command gets its model."""
    p.add_argument("--model", help="a name from `esh models` or a timm model (default: the checkpoint's)")
    p.add_argument(
        "--checkpoint",
        help="weights: the authors' released file or an esh checkpoint (esh train's best.pth: its model, "
        "classes and input size are used)",
    )
    p.add_argument("--pretrained", action="store_true", help="download the released weights (needs network)")
    p.add_argument(
        "--num-classes",
        type=int,
        help="classifier outputs (default: the checkpoint's); another number starts a new head",
    )
    p.add_argument(
        "--img-size",
        type=int,
        help="input size; position-embedded models (Vim) are built for it (default: the checkpoint's training "
        "size, else the model's own)",
    )
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="extra builder argument")
    if runs:
        add_device_argument(p)
        add_amp_arguments(p, "mixed-precision inference")
