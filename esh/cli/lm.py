"""``esh lm train`` and ``esh lm generate``: the ESH language model."""

from __future__ import annotations

import argparse
import os

from esh.cli._common import add_amp_arguments, amp_overrides
from esh.cli._config_args import add_config_arguments, given
from esh.train.lm import LMTrainConfig

_FIELDS: list[str] = []


def _cmd_lm_train(args: argparse.Namespace) -> int:
    from esh.train.lm_job import SMOKE_TEST, train_lm

    training = given(args, _FIELDS)
    training.update(amp_overrides(args))
    if args.smoke_test:
        training = {**SMOKE_TEST, **training}
    result = train_lm(
        config=args.config,
        data=args.data,
        tokenizer=args.tokenizer,
        resume=args.resume,
        sample_tokens=0 if args.smoke_test else args.sample_tokens,
        prompt=args.prompt,
        **training,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    counts = result["parameters"]
    line = f"validation loss {result['val_loss']:.4f} nats/token ({result['val_bits_per_token']:.3f} bits/token"
    if "val_bpb" in result:
        line += f", {result['val_bpb']:.3f} bits/byte, {result['val_bpc']:.3f} bits/char"
    print(
        f"ESH LM {args.config}: {counts['total'] / 1e6:.2f}M parameters ({counts['active'] / 1e6:.2f}M active), "
        f"tokenizer {result['tokenizer']}, {result['steps']} steps in {result['seconds']:.0f} s"
    )
    print(line + ")")
    if result["sample"]:
        print("sample:\n" + result["sample"])
    if result["out"]:
        print(f"checkpoint: {result['out']} (esh lm generate --checkpoint {result['out']} --prompt TEXT)")
    return 0


def _cmd_lm_generate(args: argparse.Namespace) -> int:
    from esh.train.lm_job import generate_text

    text = generate_text(
        args.checkpoint,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        device=args.device,
    )
    print(text)
    return 0


def add_parsers(sub) -> None:
    lm = sub.add_parser("lm", help="ESH language model: train on text, generate")
    lm_sub = lm.add_subparsers(dest="lm_command", metavar="COMMAND", required=True)
    train = lm_sub.add_parser("train", help="train an ESH LM (default: tiny, byte-level, on the bundled Shakespeare)")
    train.add_argument("--config", default="tiny", choices=("tiny", "small", "medium", "large"))
    train.add_argument("--data", default="shakespeare", help="shakespeare (default), FILE, DIR of .txt, or hf:NAME")
    train.add_argument("--tokenizer", default="byte", help="byte (default), char, bpe[:VOCAB], or a tokenizer PATH")
    from esh.train.lm_job import DEFAULTS

    _FIELDS[:] = add_config_arguments(
        train,
        LMTrainConfig,
        defaults=DEFAULTS,
        # the older spellings of two options
        aliases={"grad_accum": ["--gradient-accumulation-steps"], "grad_checkpointing": ["--checkpointing"]},
    )
    add_amp_arguments(train, "mixed precision")
    train.add_argument("--resume", help="an output directory of esh lm train to continue exactly")
    train.add_argument("--sample-tokens", type=int, default=200, help="tokens generated at the end (default: 200)")
    train.add_argument("--prompt", default="\n", help="prompt of that sample (default: a newline)")
    train.add_argument("--smoke-test", action="store_true", help="4 tiny steps, for CI")
    train.set_defaults(func=_cmd_lm_train)
    gen = lm_sub.add_parser("generate", help="continue a prompt with a model trained by esh lm train")
    gen.add_argument("--checkpoint", required=True, help="the output directory of esh lm train")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--device", default="cpu")
    gen.set_defaults(func=_cmd_lm_generate)
