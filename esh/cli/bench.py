"""``esh bench``: the benchmarks."""

from __future__ import annotations

import argparse


def _cmd_bench_vision(args: argparse.Namespace) -> int:
    from esh.bench.vision_throughput import main_from_args

    main_from_args(args)
    return 0


def _cmd_bench_elastic(args: argparse.Namespace) -> int:
    from esh.bench.elastic_compute import main_from_args

    main_from_args(args)
    return 0


def _cmd_bench_scan(args: argparse.Namespace) -> int:
    from esh.bench.selective_scan import main_from_args

    main_from_args(args)
    return 0


def add_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    scan = bench_sub.add_parser("scan", help="selective scan: esh vs the reference loop and mambapy")
    from esh.bench.selective_scan import add_arguments

    add_arguments(scan)
    scan.set_defaults(func=_cmd_bench_scan)
    vision = bench_sub.add_parser("vision", help="images/s of esh's vision models beside timm's")
    from esh.bench import vision_throughput

    vision_throughput.add_arguments(vision)
    vision.set_defaults(func=_cmd_bench_vision)
    elastic = bench_sub.add_parser("elastic", help="ESH-Vision: soft vs hard routing at attention budgets")
    from esh.bench import elastic_compute

    elastic_compute.add_arguments(elastic)
    elastic.set_defaults(func=_cmd_bench_elastic)
