"""ESH LM beside a GPT and a pure Mamba LM: character-level validation loss on the default
corpus at equal non-embedding parameters (about 0.8M) and an equal token budget.

The recipe is nanoGPT's CPU line (``config/train_shakespeare_char.py`` with ``--block_size=64
--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
--dropout=0.0``) for all three models: AdamW (0.9, 0.99), weight decay 0.1 on matrices, 100
warm-up steps, cosine 1e-3 -> 1e-4, clipping at 1.0, 2000 steps of 12 x 64 tokens (1.54M
training tokens), seed 1337. Corpus: the 42 Gutenberg Shakespeare texts shipped with esh
(5.06M characters, 84 symbols), first 90 % train, last 10 % validation. The validation loss is
the mean over every character of the validation split (505,720 characters, windows of 64;
``--eval-windows N`` scores N windows spread evenly over it), in nats per character, and bits
per character = nats / ln 2.

For ESH, the router on the same validation windows (``router_statistics``): mean α (averaged
over layers) by character class of the token read (letters, whitespace, punctuation, newline,
other) and by position in the window (quarters), and the validation loss with the router free,
forced to 0 (the SSM path alone) and forced to 1 (attention alone): how much each path carries.

Models (non-embedding parameters matched to the GPT's 0.79M within a few percent):
- ``gpt``: nanoGPT's model, 4 layers, 4 heads, d=128, learned positions, tied head.
- ``mamba``: 7 x [RMSNorm + Mamba-1 mixer], d=128, d_state 16, expand 2, tied head.
- ``esh``: 3 ESH blocks, d=128, 4 heads, 4 experts of width 40 (top-1), tied head.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from esh._io import write_text
from esh.bench.measure import mean_spread
from esh.data.text import ContiguousBlockDataset, LMData, RandomBlockDataset, prepare_lm_data
from esh.errors import InputError
from esh.train.checkpoint import rng_state, set_rng_state
from esh.train.lm import LMTrainConfig, LMTrainer

MODELS = ("esh", "gpt", "mamba")
ESH_ARCH = dict(d_model=128, n_layers=3, n_heads=4, n_experts=4, expert_hidden=40)


def build_model(name: str, vocab_size: int, block_size: int) -> nn.Module:
    """One of ``MODELS`` at the benchmark's size (see the module docstring)."""
    if name == "gpt":
        from esh.models.gpt import GPT, GPTConfig

        return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size + 1, n_layer=4, n_head=4, n_embd=128))
    from esh.models.esh_lm import ESHConfig, ESHModel, MambaLM

    if name == "mamba":
        return MambaLM(vocab_size, d_model=128, n_layers=7)
    if name == "esh":
        return ESHModel(ESHConfig(vocab_size=vocab_size, max_seq_len=block_size + 1, **ESH_ARCH))
    raise InputError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``total`` (each tensor once, so a tied head counts once; every expert), ``non_embedding``
    (without the token table and a learned position table) and ``active`` per token (an MoE model's
    own count; the total for dense models)."""
    if callable(getattr(model, "num_parameters", None)):
        counts = dict(model.num_parameters())
        return {k: int(counts[k]) for k in ("total", "non_embedding", "active")}
    total = sum(p.numel() for p in model.parameters())
    tables = [m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding)]
    return {"total": total, "non_embedding": total - sum(tables), "active": total}


def recipe(max_steps: int, seed: int) -> LMTrainConfig:
    """nanoGPT's CPU recipe (facts: the tiny-LM anchor), evaluation at the end only."""
    return LMTrainConfig(
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=100,
        max_steps=max_steps,
        batch_size=12,
        block_size=64,
        weight_decay=0.1,
        betas=(0.9, 0.99),
        grad_clip=1.0,
        eval_interval=0,
        eval_iters=None,
        out_dir=None,
        seed=seed,
        device="cpu",
        progress=False,
        eval_chars_per_token=1.0,
    )


def _setup(
    name: str,
    data: LMData,
    max_steps: int,
    seed: int,
    eval_windows: int | None = None,
    eval_batch: int = 64,
    progress: bool = False,
    run_dir: str | None = None,
) -> tuple[LMTrainer, DataLoader]:
    """``name``'s model built from ``seed`` and its trainer with the recipe, and the validation
    loader (``eval_windows`` windows spread evenly over the split; default all). The trainer gets
    no validation loader: the loss is measured once, after training, outside the timed part."""
    cfg = recipe(max_steps, seed)
    cfg.progress, cfg.out_dir = progress, run_dir
    torch.manual_seed(seed)
    model = build_model(name, data.tokenizer.vocab_size, cfg.block_size)
    train_set = RandomBlockDataset(data.train, cfg.block_size, num_samples=max_steps * cfg.batch_size, seed=seed)
    eval_set = ContiguousBlockDataset(data.val, cfg.block_size)
    if eval_windows and eval_windows < len(eval_set):
        eval_set = Subset(eval_set, torch.linspace(0, len(eval_set) - 1, eval_windows).long().tolist())
    trainer = LMTrainer(model, DataLoader(train_set, batch_size=cfg.batch_size), cfg)
    return trainer, DataLoader(eval_set, batch_size=eval_batch)


def _result(name: str, seed: int, data: LMData, trainer: LMTrainer, eval_loader: DataLoader, train_s: float) -> dict:
    """The row of a trained model: parameters, validation loss, training time (and for ESH the
    router's statistics on the same windows)."""
    model, cfg = trainer.model, trainer.config
    result = trainer.evaluate(eval_loader)
    nats = result["val_loss"]  # char-level: one token per character
    extra = {}
    if name == "esh":  # the router on the same windows: α by character class and position, paths forced
        extra["router"] = router_statistics(model, eval_loader, token_classes(data.tokenizer))
    return {
        "model": name,
        "seed": seed,
        **count_parameters(model),
        "val_nats_per_char": nats,
        "val_bits_per_char": nats / math.log(2),
        "val_ppl": math.exp(nats),
        "train_seconds": train_s,
        "steps": cfg.max_steps,
        "tokens": cfg.max_steps * cfg.batch_size * cfg.block_size,
        "threads": torch.get_num_threads(),
        "eval_chars": result["val_tokens"],
        **extra,
    }


def train_one(
    name: str,
    data: LMData,
    max_steps: int,
    seed: int,
    eval_windows: int | None = None,
    eval_batch: int = 64,
    progress: bool = False,
    run_dir: str | None = None,
) -> dict:
    """Train ``name`` from scratch with the recipe and return its parameters, validation loss
    (nats and bits per character) and training wall time (the optimizer steps only; the
    validation pass comes after). ``eval_windows`` scores that many windows spread evenly over
    the validation split (default: all of them); ``run_dir`` keeps the trainer's steps.csv and
    checkpoint."""
    trainer, eval_loader = _setup(name, data, max_steps, seed, eval_windows, eval_batch, progress, run_dir)
    start = time.perf_counter()
    trainer.train()
    return _result(name, seed, data, trainer, eval_loader, time.perf_counter() - start)


def train_interleaved(
    names: Sequence[str],
    data: LMData,
    max_steps: int,
    seed: int,
    round_steps: int,
    eval_windows: int | None = None,
    eval_batch: int = 64,
) -> list[dict]:
    """``train_one`` for every model of ``names``, their training interleaved: ``round_steps``
    optimizer steps of each in turn until all are done, each model's time the sum of its rounds.
    On a shared machine whose speed drifts over minutes, every model then sees the same spread of
    fast and slow moments, so the time ratios are not skewed by which model ran when. Each model
    draws from its own copy of the random streams (saved and restored around its rounds), so the
    weights and losses are those of ``train_one``, bit for bit."""
    if round_steps < 1:
        raise InputError(f"round_steps must be at least 1, got {round_steps}")
    runs = []
    for name in names:
        trainer, eval_loader = _setup(name, data, max_steps, seed, eval_windows, eval_batch)
        runs.append({"name": name, "trainer": trainer, "eval": eval_loader, "rng": rng_state(), "seconds": 0.0})
    while any(r["trainer"].step < max_steps for r in runs):
        for r in runs:
            trainer = r["trainer"]
            if trainer.step >= max_steps:
                continue
            set_rng_state(r["rng"])
            start = time.perf_counter()
            trainer.train(until=trainer.step + round_steps)
            r["seconds"] += time.perf_counter() - start
            r["rng"] = rng_state()
    return [_result(r["name"], seed, data, r["trainer"], r["eval"], r["seconds"]) for r in runs]


CHAR_CLASSES = ("letter", "whitespace", "punctuation", "newline", "other")
POSITION_BUCKETS = 4


def char_class(ch: str) -> str:
    """One of ``CHAR_CLASSES``: a newline, other whitespace, a letter, punctuation, the rest."""
    if ch == "\n":
        return "newline"
    if ch.isspace():
        return "whitespace"
    if ch.isalpha():
        return "letter"
    if unicodedata.category(ch[:1] or " ").startswith("P"):
        return "punctuation"
    return "other"


@contextlib.contextmanager
def forced_alpha(model: nn.Module, value: float):
    """Within the block, every ``TokenRouter`` of ``model`` outputs ``value`` (0.0: the SSM path
    alone, 1.0: attention alone) instead of its α."""
    from esh.layers.router import TokenRouter

    routers = [m for m in model.modules() if isinstance(m, TokenRouter)]
    if not routers:
        raise InputError(f"{type(model).__name__} has no token router to force")
    hooks = [m.register_forward_hook(lambda _m, _i, out: torch.full_like(out, value)) for m in routers]
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


def router_statistics(model: nn.Module, windows: Sequence[Tensor] | DataLoader, classes: Sequence[str]) -> dict:
    """What ESH LM's router does on validation text, and how much each path carries.

    ``windows``: batches of token ids (B, T + 1) (the evaluation loader); ``classes``: the
    character class (``char_class``) of every token id. α of a token is the router's output
    at that token (read there, before predicting the next), averaged over the layers.

    Returns ``alpha_by_class`` (mean α and token count per class), ``alpha_by_position`` (mean α
    in each of ``POSITION_BUCKETS`` equal spans of the window, first to last) and the next-token
    loss in nats per token with the router free (``val_nats``), forced to 0 (``val_nats_ssm_only``:
    attention off) and forced to 1 (``val_nats_attention_only``)."""
    model.eval()
    names = list(CHAR_CLASSES)
    lookup = torch.tensor([names.index(c) for c in classes])
    sums, counts = torch.zeros(len(names), dtype=torch.float64), torch.zeros(len(names), dtype=torch.float64)
    pos_sums = torch.zeros(POSITION_BUCKETS, dtype=torch.float64)
    pos_counts = torch.zeros(POSITION_BUCKETS, dtype=torch.float64)
    losses = {"val_nats": [0.0, 0], "val_nats_ssm_only": [0.0, 0], "val_nats_attention_only": [0.0, 0]}
    with torch.no_grad():
        for batch in windows:
            ids = batch if torch.is_tensor(batch) else batch["input_ids"]
            n = ids.shape[0] * (ids.shape[1] - 1)
            out = model(ids, labels=ids)
            alpha = torch.stack([a.double() for a in out.alphas]).mean(0)  # (B, T + 1)
            cls = lookup[ids]
            sums.index_add_(0, cls.flatten(), alpha.flatten())
            counts.index_add_(0, cls.flatten(), torch.ones(alpha.numel(), dtype=torch.float64))
            bucket = (torch.arange(ids.shape[1]) * POSITION_BUCKETS // ids.shape[1]).expand_as(ids)
            pos_sums.index_add_(0, bucket.flatten(), alpha.flatten())
            pos_counts.index_add_(0, bucket.flatten(), torch.ones(alpha.numel(), dtype=torch.float64))
            losses["val_nats"][0] += float(out.ce_loss) * n
            for key, value in (("val_nats_ssm_only", 0.0), ("val_nats_attention_only", 1.0)):
                with forced_alpha(model, value):
                    losses[key][0] += float(model(ids, labels=ids).ce_loss) * n
            for key in losses:
                losses[key][1] += n
    result = {
        "alpha_by_class": {
            c: {"alpha": float(sums[i] / counts[i]) if counts[i] else math.nan, "tokens": int(counts[i])}
            for i, c in enumerate(names)
        },
        "alpha_by_position": [float(pos_sums[i] / max(pos_counts[i], 1)) for i in range(POSITION_BUCKETS)],
    }
    result.update({k: total / max(count, 1) for k, (total, count) in losses.items()})
    return result


def token_classes(tokenizer) -> list[str]:
    """``char_class`` of every token id of a character-level tokenizer."""
    return [char_class(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)]


def format_router_table(rows: Sequence[dict]) -> str:
    """ESH rows with router statistics: mean α per character class and position span, and the
    validation loss with the router free, attention off and attention alone."""
    lines = [
        "| seed | "
        + " | ".join(f"α {c}" for c in CHAR_CLASSES)
        + " | α by position (quarters) | nats free | attention off | attention only |",
        "|---|" + "---:|" * len(CHAR_CLASSES) + "---|---:|---:|---:|",
    ]
    for r in rows:
        st = r.get("router")
        if not st:
            continue
        by_class = " | ".join(f"{st['alpha_by_class'][c]['alpha']:.3f}" for c in CHAR_CLASSES)
        positions = " / ".join(f"{a:.3f}" for a in st["alpha_by_position"])
        lines.append(
            f"| {r['seed']} | {by_class} | {positions} | {st['val_nats']:.4f} | {st['val_nats_ssm_only']:.4f} "
            f"| {st['val_nats_attention_only']:.4f} |"
        )
    return "\n".join(lines)


def format_table(rows: Sequence[dict]) -> str:
    lines = [
        "| model | params total | non-embedding | active / token | val nats/char | bits/char | ppl | train time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} (seed {r['seed']}) | {r['total'] / 1e6:.3f}M | {r['non_embedding'] / 1e6:.3f}M | "
            f"{r['active'] / 1e6:.3f}M | {r['val_nats_per_char']:.4f} | {r['val_bits_per_char']:.3f} | "
            f"{r['val_ppl']:.2f} | {r['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def summarize(rows: Sequence[dict]) -> dict[str, dict]:
    """Per model, over its seeds: the validation nats and bits per character and the training
    seconds (lists, in seed order), and the training time relative to the GPT of the same seed
    (where the GPT ran with that seed)."""
    gpt_seconds = {r["seed"]: r["train_seconds"] for r in rows if r["model"] == "gpt"}
    out: dict[str, dict] = {}
    for r in rows:
        m = out.setdefault(r["model"], {"seeds": [], "nats": [], "bits": [], "seconds": [], "vs_gpt": [], "row": r})
        m["seeds"].append(r["seed"])
        m["nats"].append(r["val_nats_per_char"])
        m["bits"].append(r["val_bits_per_char"])
        m["seconds"].append(r["train_seconds"])
        if r["seed"] in gpt_seconds:
            m["vs_gpt"].append(r["train_seconds"] / gpt_seconds[r["seed"]])
    return out


def format_summary(rows: Sequence[dict]) -> str:
    """Markdown: one line per model, mean ± standard deviation over its seeds."""
    lines = [
        "| model | seeds | params total | non-embedding | active / token | val nats/char | bits/char | train time "
        "| train time / GPT's |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in summarize(rows).items():
        r = m["row"]
        ratio = mean_spread(m["vs_gpt"], 2) + "x" if m["vs_gpt"] else "-"
        lines.append(
            f"| {name} | {', '.join(map(str, m['seeds']))} | {r['total'] / 1e6:.3f}M | {r['non_embedding'] / 1e6:.3f}M "
            f"| {r['active'] / 1e6:.3f}M | {mean_spread(m['nats'], 3)} | {mean_spread(m['bits'], 3)} "
            f"| {mean_spread(m['seconds'], 0)} s | {ratio} |"
        )
    return "\n".join(lines)


def format_router_summary(rows: Sequence[dict]) -> str:
    """Markdown: ESH's router statistics, mean ± standard deviation over seeds."""
    stats = [r["router"] for r in rows if r.get("router")]
    if not stats:
        return ""
    cells = [mean_spread([st["alpha_by_class"][c]["alpha"] for st in stats], 3) for c in CHAR_CLASSES]
    positions = " / ".join(
        f"{statistics.fmean(st['alpha_by_position'][i] for st in stats):.3f}" for i in range(POSITION_BUCKETS)
    )
    losses = [
        mean_spread([st[k] for st in stats], 3) for k in ("val_nats", "val_nats_ssm_only", "val_nats_attention_only")
    ]
    return "\n".join(
        [
            "| seeds | "
            + " | ".join(f"α {c}" for c in CHAR_CLASSES)
            + " | α by position (quarters, mean) | nats free | attention off | attention only |",
            "|---|" + "---:|" * len(CHAR_CLASSES) + "---|---:|---:|---:|",
            f"| {len(stats)} | {' | '.join(cells)} | {positions} | {' | '.join(losses)} |",
        ]
    )


def print_tables(rows: Sequence[dict], print_fn: Callable[[str], None] = print) -> None:
    """The per-run table, the summary over seeds, and ESH's router tables."""
    print_fn(format_table(rows))
    print_fn("mean ± standard deviation over seeds:")
    print_fn(format_summary(rows))
    if any("router" in r for r in rows):
        print_fn("ESH's router (α averaged over layers; validation nats/char with the router free, forced to 0, to 1):")
        print_fn(format_router_table(rows))
        print_fn(format_router_summary(rows))


def interleave_problem(interleave: int | None, run_dir: str | None, progress: bool) -> str | None:
    """What is wrong with ``run``'s ``interleave`` setting beside the others (``--interleave``,
    ``--run-dir``, ``--progress``), or None: interleaved turns keep no per-run folder and show no
    progress bars."""
    if interleave is not None and (interleave < 1 or run_dir or progress):
        return "--interleave takes a number of steps >= 1, and neither --run-dir nor --progress"
    return None


def run(
    models: Sequence[str] = MODELS,
    seeds: Sequence[int] = (1337,),
    max_steps: int = 2000,
    threads: int | None = None,
    out: str | None = None,
    progress: bool = False,
    eval_windows: int | None = None,
    run_dir: str | None = None,
    interleave: int | None = None,
    print_fn: Callable[[str], None] = print,
) -> list[dict]:
    """Train every model for every seed, one after the other (or, with ``interleave``, a seed's
    models in turns of that many steps: ``train_interleaved``); each result is appended to
    ``out`` (JSON lines) as soon as it is known."""
    problem = interleave_problem(interleave, run_dir, progress)
    if problem:
        raise InputError(problem)
    if threads:
        torch.set_num_threads(threads)
    data = prepare_lm_data("shakespeare", tokenizer="char")
    rows = []
    for seed in seeds:
        if interleave:
            seed_rows = train_interleaved(models, data, max_steps, seed, interleave, eval_windows)
        else:
            seed_rows = (
                train_one(
                    name, data, max_steps, seed, eval_windows, progress=progress,
                    run_dir=str(Path(run_dir) / f"{name}_seed{seed}") if run_dir else None,
                )
                for name in models
            )  # fmt: skip
        for row in seed_rows:
            rows.append(row)
            print_fn(json.dumps(row))
            if out:
                append_row(out, row)
    print_fn(
        f"char-level Shakespeare ({len(data.train):,} train / {len(data.val):,} validation characters), "
        f"{max_steps} steps x 12 x 64 tokens, {torch.get_num_threads()} threads"
    )
    print_tables(rows, print_fn)
    return rows


def append_row(path: str | Path, row: dict) -> None:
    """Add one JSON line to ``path``: the file with the new line replaces the old one, so a
    killed run never leaves half a line."""
    before = Path(path).read_text() if Path(path).is_file() else ""
    write_text(path, before + json.dumps(row) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1337])
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="append each result to this JSON-lines file")
    parser.add_argument("--table", help="only print the table of a JSON-lines file written by --out")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--eval-windows", type=int, help="windows of 64 scored, spread over the split (default: all)")
    parser.add_argument("--run-dir", help="keep each run's steps.csv and checkpoint under this folder")
    parser.add_argument(
        "--interleave",
        type=int,
        metavar="STEPS",
        help="train a seed's models in turns of STEPS steps (fair times on a machine whose speed drifts; same results)",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    problem = interleave_problem(args.interleave, args.run_dir, args.progress)
    if problem:
        parser.error(problem)  # one line, exit 2
    if args.table:
        rows = [json.loads(line) for line in Path(args.table).read_text().splitlines() if line.strip()]
        print_tables(rows)
        return
    run(
        args.models,
        args.seeds,
        args.max_steps,
        args.threads or None,
        args.out,
        args.progress,
        args.eval_windows,
        args.run_dir,
        args.interleave,
    )
