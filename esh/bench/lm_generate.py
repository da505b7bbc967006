"""Decoding speed of the ESH LM with its hybrid cache, without it, and of a GPT with a KV cache.

For every prompt length (context) the latency per new token is
``(time(generate ctx -> 1 + n tokens) - time(generate ctx -> 1 token)) / n``, so the prompt's
prefill is left out; tokens/s is its inverse (batch 1, greedy). Small byte-level models:
ESH ``esh_tiny`` (d=128, 4 blocks, 4 experts of 256; 2.4M parameters) and a GPT of the same
width and depth (d=128, 4 layers, 4 heads, learned positions long enough for the context;
KV cache preallocated). Without a cache every new token re-runs the whole sequence, so its
cost grows with the context; with the cache the SSM path costs O(1) per token and attention
O(context).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from esh.bench.measure import time_call

CONTEXTS = (128, 512, 2048, 8192)


def build(name: str, max_len: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "gpt":
        from esh.models.gpt import GPT, GPTConfig

        return GPT(GPTConfig(vocab_size=256, block_size=max_len, n_layer=4, n_head=4, n_embd=128)).eval()
    from esh.models.esh_lm import ESHModel, esh_tiny

    return ESHModel(esh_tiny(max_seq_len=max_len)).eval()


def latency_per_token(model: torch.nn.Module, context: int, new_tokens: int, use_cache: bool, repeats: int) -> float:
    """Seconds per generated token after a ``context``-token prompt (prefill excluded)."""
    prompt = torch.randint(0, 256, (1, context), generator=torch.Generator().manual_seed(context))

    def gen(n: int):
        return lambda: model.generate(prompt, max_new_tokens=n, use_cache=use_cache)

    first = time_call(gen(1), repeats=repeats, warmup=1, best=True)
    full = time_call(gen(1 + new_tokens), repeats=repeats, warmup=0, best=True)
    return max(full - first, 0.0) / new_tokens


def run(
    contexts: Sequence[int] = CONTEXTS,
    new_tokens: int = 32,
    new_tokens_uncached: int = 4,
    threads: int | None = 1,
    repeats: int = 2,
    print_fn: Callable[[str], None] = print,
) -> list[tuple]:
    if threads:
        torch.set_num_threads(threads)
    rows = []
    max_len = max(contexts) + new_tokens + 2
    cases = (
        ("ESH LM tiny, cache", "esh", True),
        ("ESH LM tiny, no cache", "esh", False),
        ("GPT, KV cache", "gpt", True),
    )
    models = {name: build(name, max_len) for name in ("esh", "gpt")}
    for ctx in contexts:
        for label, name, cache in cases:
            n = new_tokens if cache else new_tokens_uncached
            with torch.inference_mode():
                seconds = latency_per_token(models[name], ctx, n, cache, repeats)
            rows.append((ctx, label, seconds))
            print_fn(f"context {ctx}: {label}: {1e3 * seconds:.2f} ms/token")
    lines = [
        f"decoding, batch 1, greedy, {torch.get_num_threads()} thread(s); ms per new token (tokens/s)",
        "| context | " + " | ".join(c[0] for c in cases) + " | cache speed-up (ESH) |",
        "|---:|" + "---:|" * (len(cases) + 1),
    ]
    for ctx in contexts:
        cells = {label: s for c, label, s in rows if c == ctx}
        row = " | ".join(f"{1e3 * cells[c[0]]:.1f} ({1 / max(cells[c[0]], 1e-12):.0f})" for c in cases)
        speedup = cells[cases[1][0]] / max(cells[cases[0][0]], 1e-12)
        lines.append(f"| {ctx} | {row} | {speedup:.1f}x |")
    print_fn("\n".join(lines))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contexts", nargs="+", type=int, default=list(CONTEXTS))
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens timed with a cache")
    parser.add_argument("--new-tokens-uncached", type=int, default=4, help="tokens timed without (slow)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(args.contexts, args.new_tokens, args.new_tokens_uncached, args.threads or None, args.repeats)
