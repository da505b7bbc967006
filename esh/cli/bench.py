"""``esh bench NAME [ARGS...]``: every benchmark of ``benchmarks/``, one module each in
``esh.bench``. A benchmark's module is imported only when it runs, so building the parser
(``esh --help``, any other command) imports none of them; its own ``main(argv)`` reads ARGS
(``esh bench NAME --help`` lists them)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

# name -> (module in esh.bench, one line for `esh bench --help`)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "scan": ("selective_scan", "selective scan: esh vs the reference loop and mambapy"),
    "vision": ("vision_throughput", "images/s of esh's vision models beside timm's"),
    "train": (
        "train_throughput",
        "training images/s of each esh vision family beside a timm model; --lm: LM tokens/s beside the GPT",
    ),
    "train-step": ("train_step_profile", "s/step of one training step (Vim, ESH-Vision, ESH LM) and its op profile"),
    "elastic": ("elastic_compute", "ESH-Vision: soft vs hard routing at attention budgets"),
    "routing": ("esh_routing", "ESH-Vision trained with and without routing terms: accuracy vs img/s, α statistics"),
    "lm-generate": ("lm_generate", "ESH LM decoding ms/token with its cache, without, and a GPT's"),
    "lm-memory": ("lm_memory", "ESH LM training-step peak memory with and without checkpointing and bf16"),
    "lm-quality": ("lm_quality", "ESH LM vs GPT vs Mamba validation loss on character-level Shakespeare"),
    "alignment": ("alignment", "alignment metrics (MKNN, CKNNA, CKA): seconds and peak memory at scale"),
    "device": ("device_stack", "GPU end-to-end figures: vision img/s, LM tokens/s and decode, peak memory"),
}


@contextlib.contextmanager
def _program_name(name: str):
    """The benchmark's own parser names itself after ``sys.argv[0]``: ``esh bench NAME`` there."""
    saved = sys.argv[0] if sys.argv else ""
    if not sys.argv:
        sys.argv.append(saved)
    sys.argv[0] = f"esh bench {name}"
    try:
        yield
    finally:
        sys.argv[0] = saved


def _cmd_bench(args: argparse.Namespace) -> int:
    from esh.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # the figures a user of the esh command gets (see esh.runtime)
    module = importlib.import_module(f"esh.bench.{BENCHMARKS[args.benchmark][0]}")
    with _program_name(args.benchmark):
        module.main(list(args.bench_args))
    return 0


def add_parsers(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks (esh bench NAME --help for one's options)",
        description="Run one benchmark; each takes its own options (esh bench NAME --help).",
    )
    bench_sub = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (_, help_text) in BENCHMARKS.items():
        p = bench_sub.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
        p.add_argument("bench_args", nargs=argparse.REMAINDER)
        p.set_defaults(func=_cmd_bench)
