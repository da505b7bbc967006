"""The ``esh`` command. It only parses arguments and calls library functions that a Python
user can call the same way. One module per group of commands: ``vision`` (models, predict,
eval, info, export, saliency), ``train``, ``data`` (embed, align), ``lm`` and ``bench``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Sequence

from esh._version import __version__
from esh.cli import bench, data, lm, train, vision
from esh.cli._common import parse_model_args

__all__ = ["build_parser", "main", "parse_model_args"]


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that report bad input or a missing resource, shown as one line: esh's own
    (:class:`esh.errors.EshError`) and the operating system's about a path the user gave."""
    from esh.errors import EshError

    return (EshError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esh", description="Hybrid state-space / attention backbones.")
    parser.add_argument("--version", action="version", version=f"esh {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also ESH_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for group in (train, vision, data, lm, bench):
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from esh.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # freed activations stay in the heap: no page faults per tensor (esh.runtime)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("ESH_DEBUG", "") not in ("", "0")
    try:
        with _notes_on_one_line(args.command, debug):
            return args.func(args)
    except _user_errors() as e:
        # bad input (a missing file, a checkpoint for another model, ...): one clear line
        if debug:
            raise
        print(f"esh {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except _out_of_memory_errors() as e:  # the sizes the user chose do not fit this machine
        if debug:
            raise
        detail = _one_line(e).split(". ")[0] if str(e) else "the allocation failed"
        print(
            f"esh {args.command}: error: out of memory ({detail}); "
            "try a smaller --batch-size or --img-size, or another --device",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"esh {args.command}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _notes_on_one_line(command: str, debug: bool):
    """Warnings that esh itself issues (a classifier started anew, images left out) printed as
    one line, ``esh CMD: note: ...``, instead of Python's two (file, line and source); others,
    and all with ``--debug``, as Python shows them."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if debug or not os.path.abspath(filename).startswith(package):
            return shown(message, category, filename, lineno, file, line)
        print(f"esh {command}: note: {' '.join(str(message).split())}", file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    import torch

    return (MemoryError, torch.OutOfMemoryError)


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
