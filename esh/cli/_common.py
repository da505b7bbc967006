"""What the ``esh`` commands share: the model arguments, ``--amp``, ``KEY=VALUE`` model arguments."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from esh.errors import InputError


def load_model(args: argparse.Namespace):
    from esh.models import create_model

    kwargs = {}
    if getattr(args, "num_classes", None) is not None:
        kwargs["num_classes"] = args.num_classes
    return create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint, **kwargs)


def add_amp_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--amp`` and ``--amp-dtype``: one meaning wherever a command runs a model."""
    parser.add_argument("--amp", action="store_true", help=f"{what} (autocast; see --amp-dtype)")
    parser.add_argument(
        "--amp-dtype",
        choices=("bfloat16", "float16"),
        help="with --amp (default: bfloat16 on CPU and on GPUs that have it, Ampere and newer; else float16, "
        "with a gradient scaler when training on CUDA)",
    )


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


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--checkpoint``, ``--pretrained``, ``--device`` and ``--amp``: how a command
    that runs a model gets it."""
    p.add_argument("--model", required=True, help="a name from `esh models`")
    p.add_argument("--checkpoint", help="weights: the authors' released file or an esh checkpoint")
    p.add_argument("--pretrained", action="store_true", help="download the released weights (needs network)")
    p.add_argument("--device", default="cpu")
    add_amp_arguments(p, "mixed-precision inference")
