"""Training images per second of each esh vision family next to a timm model of similar
size, measured in the same run: forward, backward and an AdamW step, float32 (and bfloat16
autocast), random data at the esh model's default input size (the peer gets the same).

Every (model, mode) is built and warmed up first; then each round times one training step of
every (model, mode) in turn, so that a busy or throttling machine slows all of them alike,
and each figure is the median over the rounds.

``--lm`` times the language models of ``benchmarks/lm_quality.py`` instead (ESH LM, the GPT and
the pure Mamba LM at that benchmark's sizes): each round runs ``--lm-steps`` optimizer steps of
each model's own ``LMTrainer`` with that benchmark's recipe (12 x 64 tokens of the character-level
Shakespeare corpus, AdamW, clipping, the MoE's auxiliary losses), and the table gives training
tokens/s and each model's time per token relative to the GPT's."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from esh.bench.measure import interleaved_medians
from esh.bench.vision_throughput import build
from esh.errors import InputError

# (esh model, timm model of similar size)
PAIRS = (
    ("mambavision_nano", "mobilenetv3_small_100"),
    ("mambavision_t", "convnext_tiny"),
    ("vim_tiny", "deit_tiny_patch16_224"),
    ("esh_vision_tiny", "deit_small_patch16_224"),
)


def training_step(name: str, batch: int, size: int | None, amp: bool) -> tuple[Callable[[], None], int, int]:
    """(one training step of a fresh ``name`` on fixed random data, input size, parameters)."""
    model = build(name).train()
    if size is None:
        size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,)) % model.num_classes

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    params = sum(p.numel() for p in model.parameters())
    return step, size, params


def run(
    pairs: Sequence[tuple[str, str]] = PAIRS,
    batch: int = 8,
    threads: int | None = 2,
    repeats: int = 3,
    bf16: bool = True,
    print_fn: Callable[[str], None] = print,
) -> list[tuple]:
    """Rows (pair's esh model, model, input size, parameters, img/s fp32, img/s bf16 or None)."""
    if threads:
        torch.set_num_threads(threads)
    modes = (False, True) if bf16 else (False,)
    steps, info = {}, {}
    for ours, peer in pairs:
        size = None  # the esh model's default input size, used for its peer too
        for name in (ours, peer):
            for amp in modes:
                steps[ours, name, amp], size, params = training_step(name, batch, size, amp)
                steps[ours, name, amp]()  # warm-up
            info[ours, name] = (size, params)
    medians = interleaved_medians(list(steps.values()), repeats)
    ips = {key: batch / t for key, t in zip(steps, medians)}
    rows = [
        (ours, name, *info[ours, name], ips[ours, name, False], ips.get((ours, name, True)))
        for ours, peer in pairs
        for name in (ours, peer)
    ]
    lines = [
        f"training throughput (forward + backward + AdamW step), batch {batch}, {torch.get_num_threads()} threads, "
        f"median of {repeats} interleaved rounds",
        "| family pair | model | input | params | train img/s fp32 | vs peer | train img/s bf16 autocast |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    peers = {r[0]: r[4] for r in rows if r[1] != r[0]}
    for ours, name, size, params, fp32, amp in rows:
        ratio = f"{fp32 / peers[ours]:.2f}x" if name == ours else "1.00x"
        amp_text = "-" if amp is None else f"{amp:.1f}"
        lines.append(f"| {ours} | {name} | {size}² | {params / 1e6:.1f}M | {fp32:.1f} | {ratio} | {amp_text} |")
    print_fn("\n".join(lines))
    return rows


LM_MODELS = ("esh", "gpt", "mamba")


def lm_trainer(name: str, data, seed: int = 0, steps: int = 100_000):
    """An ``LMTrainer`` of lm_quality's model ``name`` with its recipe, on ``data`` (an
    ``LMData``), ready to run up to ``steps`` optimizer steps."""
    from torch.utils.data import DataLoader

    from esh.bench.lm_quality import build_model, recipe
    from esh.data.text import RandomBlockDataset
    from esh.train.lm import LMTrainer

    cfg = recipe(steps, seed)
    torch.manual_seed(seed)
    model = build_model(name, data.tokenizer.vocab_size, cfg.block_size)
    windows = RandomBlockDataset(data.train, cfg.block_size, num_samples=steps * cfg.batch_size, seed=seed)
    return LMTrainer(model, DataLoader(windows, batch_size=cfg.batch_size), cfg)


def run_lm(
    models: Sequence[str] = LM_MODELS,
    steps: int = 20,
    threads: int | None = 2,
    repeats: int = 3,
    data=None,
    print_fn: Callable[[str], None] = print,
) -> list[tuple]:
    """Rows (model, parameters, training tokens/s, time per token / the GPT's or None): each
    round runs ``steps`` optimizer steps of every model in turn (after ``steps`` of warm-up)."""
    from esh.bench.lm_quality import count_parameters
    from esh.data.text import prepare_lm_data

    if threads:
        torch.set_num_threads(threads)
    data = data if data is not None else prepare_lm_data("shakespeare", tokenizer="char")
    repeats = max(1, repeats)
    trainers = {name: lm_trainer(name, data, steps=steps * (repeats + 1)) for name in models}

    def advance(trainer):
        return lambda: trainer.train(until=trainer.step + steps)

    for trainer in trainers.values():
        advance(trainer)()  # warm-up
    medians = interleaved_medians([advance(t) for t in trainers.values()], repeats)
    tokens = steps * trainers[models[0]].config.batch_size * trainers[models[0]].config.block_size
    tps = {name: tokens / t for name, t in zip(trainers, medians)}
    gpt = tps.get("gpt")
    rows = [
        (name, count_parameters(t.model)["total"], tps[name], gpt / tps[name] if gpt else None)
        for name, t in trainers.items()
    ]
    lines = [
        f"language-model training (lm_quality's models and recipe, 12 x 64 tokens per step), "
        f"{torch.get_num_threads()} threads, median of {repeats} interleaved rounds of {steps} steps",
        "| model | params | train tokens/s | time / GPT's |",
        "|---|---:|---:|---:|",
    ]
    for name, params, rate, rel in rows:
        rel_text = "-" if rel is None else f"{rel:.2f}x"
        lines.append(f"| {name} | {params / 1e6:.2f}M | {rate:,.0f} | {rel_text} |")
    print_fn("\n".join(lines))
    return rows


def _pair_names() -> list[str]:
    return [ours for ours, _ in PAIRS]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median per model)")
    parser.add_argument(
        "--pairs", nargs="+", metavar="ESH_MODEL", help=f"only these pairs, named by their esh model: {_pair_names()}"
    )
    parser.add_argument("--no-bf16", action="store_true", help="float32 only")
    parser.add_argument(
        "--lm",
        nargs="*",
        choices=LM_MODELS,
        metavar="MODEL",
        help=f"time the language models of lm_quality instead of the vision pairs (some of {list(LM_MODELS)}; "
        "default all)",
    )
    parser.add_argument("--lm-steps", type=int, default=20, help="optimizer steps per model per round (--lm)")


def select_pairs(names: Sequence[str] | None) -> tuple[tuple[str, str], ...]:
    if not names:
        return PAIRS
    unknown = [n for n in names if n not in _pair_names()]
    if unknown:
        raise InputError(f"--pairs: unknown pair {unknown[0]!r}; expected some of {_pair_names()}")
    return tuple(p for p in PAIRS if p[0] in names)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    main_from_args(parser.parse_args(argv))


def main_from_args(args: argparse.Namespace) -> list[tuple]:
    if args.repeats < 1:
        raise InputError(f"--repeats must be a positive number of rounds; got {args.repeats}")
    if args.lm is not None:
        if args.lm_steps < 1:
            raise InputError(f"--lm-steps must be a positive number of steps; got {args.lm_steps}")
        return run_lm(tuple(args.lm) or LM_MODELS, args.lm_steps, args.threads or None, args.repeats)
    return run(select_pairs(args.pairs), args.batch_size, args.threads or None, args.repeats, not args.no_bf16)
