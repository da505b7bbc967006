"""The ``esh`` command. It only parses arguments and calls library functions that a Python
user can call the same way."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from esh._version import __version__


def _cmd_models(args: argparse.Namespace) -> int:
    from esh.models import list_models

    names = list_models(args.pattern)
    if not names:
        what = f"matching {args.pattern!r}" if args.pattern else "registered"
        print(f"no models {what}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


def _cmd_bench_scan(args: argparse.Namespace) -> int:
    from esh.bench.selective_scan import main_from_args

    main_from_args(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esh", description="Hybrid state-space / attention backbones.")
    parser.add_argument("--version", action="version", version=f"esh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    models = sub.add_parser("models", help="list registered models")
    models.add_argument("pattern", nargs="?", help="wildcard or substring, e.g. 'mambavision*' or 'vim'")
    models.set_defaults(func=_cmd_models)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    scan = bench_sub.add_parser("scan", help="selective scan: esh vs the reference loop and mambapy")
    from esh.bench.selective_scan import add_arguments

    add_arguments(scan)
    scan.set_defaults(func=_cmd_bench_scan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
