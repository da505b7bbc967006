"""The ``esh`` command. It only parses arguments and calls library functions that a Python
user can call the same way."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

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


def _load_model(args: argparse.Namespace):
    from esh.models import create_model

    kwargs = {}
    if getattr(args, "num_classes", None) is not None:
        kwargs["num_classes"] = args.num_classes
    return create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint, **kwargs)


def _cmd_predict(args: argparse.Namespace) -> int:
    from esh.inference import predict

    results = predict(
        _load_model(args), args.images, topk=args.topk, device=args.device, amp=args.amp, amp_dtype=args.amp_dtype
    )
    for path, preds in zip(args.images, results):
        print(path)
        for p in preds:
            print(f"  {p.probability:7.2%}  {p.index:4d}  {p.name}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from esh.inference import evaluate

    model = _load_model(args)
    if args.routing is not None:  # ESH models: evaluate the blend, or the hard routing with real savings
        if not hasattr(model, "set_routing"):
            raise ValueError(f"--routing needs a model with α routing (esh_vision_*); {args.model} has none")
        model.set_routing(args.routing, attention_fraction=args.attention_fraction, exclusive=args.exclusive)
    elif args.attention_fraction is not None or args.exclusive:
        raise ValueError("--attention-fraction and --exclusive go with --routing hard")
    result = evaluate(
        model,
        args.data,
        batch_size=args.batch_size,
        device=args.device,
        amp=args.amp,
        workers=args.workers,
        img_size=args.img_size,
        amp_dtype=args.amp_dtype,
    )
    print(f"{args.model}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  on {result['images']} images")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from esh.info import model_info

    print(model_info(args.model, img_size=args.img_size).format())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from esh.export import export_model

    model = _load_model(args)
    result = export_model(model, args.out, args.format, img_size=args.img_size, batch_size=args.batch_size)
    shape = "x".join(map(str, result.input_shape))
    diff = f"max relative difference to eager {result.max_rel_diff:.1e}"
    print(f"wrote {result.path} ({result.format}, input {shape}); {diff}")
    return 0


_TRAIN_FLAGS = {
    # flag: (type, help); defaults live in TrainConfig, so that --resume keeps the saved ones
    "model": (str, "model name (default: mambavision_nano, esh's CPU-sized hybrid)"),
    "data": (str, "'digits' (embedded MNIST-5k), DIR with train/ and val/, FILE.npz, or hf:NAME"),
    "epochs": (int, "epochs (default 8)"),
    "batch_size": (int, "batch size (default 64)"),
    "lr": (float, "peak learning rate (default 3e-3)"),
    "weight_decay": (float, "weight decay (default 0.05)"),
    "optimizer": (str, "timm optimizer: adamw, lamb, sgd, ... (default adamw)"),
    "warmup_epochs": (float, "linear warm-up epochs before the cosine decay (default 1)"),
    "img_size": (int, "input size (default: the model's)"),
    "num_classes": (int, "default: the number of classes in the data"),
    "checkpoint": (str, "initial weights"),
    "out": (str, "output directory (default runs/train)"),
    "device": (str, "cpu, cuda, cuda:1, mps"),
    "seed": (int, "seed for everything (default 0)"),
    "workers": (int, "data-loading processes (default 0)"),
    "log": (str, "csv (always written), tensorboard or wandb"),
    "grad_accum": (int, "gradient accumulation steps"),
    "clip_grad": (float, "gradient-norm clipping (default 5; 0 disables)"),
    "label_smoothing": (float, "default 0.1"),
    "mixup": (float, "mixup alpha (default 0: off)"),
    "cutmix": (float, "cutmix alpha (default 0: off)"),
    "ema_decay": (float, "model EMA decay, with --ema"),
    "randaug": (str, "RandAugment policy, e.g. rand-m9-mstd0.5"),
    "hflip": (float, "horizontal-flip probability (default 0: digits are not symmetric)"),
    "color_jitter": (float, "colour jitter strength"),
    "re_prob": (float, "random-erasing probability"),
    "max_steps": (int, "stop after this many optimizer steps"),
    "save_every": (int, "also checkpoint every N optimizer steps"),
    "log_interval": (int, "write steps.csv and refresh the progress bar every N optimizer steps (default 10)"),
}
_TRAIN_SWITCHES = {
    "ema": "keep an EMA of the weights and validate it too",
    "grad_checkpointing": "recompute blocks in the backward to save memory (default: the model's choice)",
    "channels_last": "channels-last memory format",
    "compile": "torch.compile the model",
}


def _parse_model_args(items: Sequence[str]) -> dict:
    """``KEY=VALUE`` pairs for the model builder; values are read as Python literals when they parse."""
    import ast

    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg expects KEY=VALUE with KEY a Python name, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def _cmd_train(args: argparse.Namespace) -> int:
    from esh.train import TrainConfig, train

    # only what was given on the command line: the rest keeps TrainConfig's (or, with
    # --resume, the saved run's) values; `0` is a value (e.g. --clip-grad 0), not "unset"
    overrides = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    overrides.update({k: True for k in _TRAIN_SWITCHES if getattr(args, k)})
    if args.amp:
        overrides["amp"] = True
    if args.amp_dtype is not None:
        overrides["amp_dtype"] = args.amp_dtype
    if args.augment is False:
        overrides["augment"] = False
    if args.no_grad_checkpointing:
        overrides["grad_checkpointing"] = False
    model_kwargs = _parse_model_args(args.model_arg or [])
    if args.ponder_warmup is not None:
        model_kwargs["ponder_warmup_steps"] = args.ponder_warmup
    if model_kwargs:
        overrides["model_kwargs"] = model_kwargs
    if args.smoke_test:
        overrides.setdefault("epochs", 1)
        overrides.setdefault("max_steps", 20)
    result = train(resume=args.resume, **overrides) if args.resume else train(TrainConfig(**overrides))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only the first process reports
        return 0
    print(
        f"best validation accuracy {result['best_val_acc']:.2f}%, final {result['final_val_acc']:.2f}%; "
        f"checkpoint {result['checkpoint']} (outputs in {result['out']})"
    )
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from esh.embed import get_adapter
    from esh.embed.dataset import embed_dataset

    adapter = get_adapter(args.model, args.checkpoint, device=args.device, amp=args.amp, amp_dtype=args.amp_dtype)
    path = embed_dataset(adapter, args.data, args.out, batch_size=args.batch_size, layers=args.layers)
    print(f"wrote {path} ({args.model}, pooling: {adapter.pooling})")
    return 0


def _cmd_align(args: argparse.Namespace) -> int:
    from esh.align import score
    from esh.align.io import load_embeddings

    if args.layerwise:
        from esh.align.io import load_layers
        from esh.align.layerwise import best_pair, layerwise, save_heatmap

        la, lb = load_layers(args.a), load_layers(args.b)
        for metric in args.metric:
            scores = layerwise(la, lb, metric, k=args.k, clip_quantile=args.clip_quantile)
            i, j, v = best_pair(scores)
            print(f"{metric}: {len(la)} x {len(lb)} layers, best A layer {i} / B layer {j} = {v:.6f}")
            if args.heatmap:
                out = Path(args.heatmap)
                out = out if len(args.metric) == 1 else out.with_name(f"{out.stem}_{metric}{out.suffix}")
                save_heatmap(scores, out, title=f"{metric}: {Path(args.a).stem} vs {Path(args.b).stem}")
                print(f"heatmap: {out}")
        return 0
    A, B = load_embeddings(args.a, args.column), load_embeddings(args.b, args.column)
    for metric in args.metric:
        value = score(A, B, metric, k=args.k, clip_quantile=args.clip_quantile, clip_mode=args.clip_mode)
        print(f"{metric}: {value:.6f}")
    return 0


def _cmd_saliency(args: argparse.Namespace) -> int:
    from esh.viz.saliency import demo, load_saliency_model, save_saliency

    if args.demo == bool(args.image):
        raise ValueError("give either --image IMG or --demo")
    if args.demo:
        try:
            paths = demo(
                args.out or "saliency_demo", args.model, args.checkpoint, args.per_block, args.img_size, args.device
            )
        except ImportError as e:  # scikit-image, which ships the photographs, is an optional extra
            print(f"esh saliency: error: {e}", file=sys.stderr)
            return 2
    else:
        model, info = load_saliency_model(args.model, args.checkpoint, args.pretrained, args.device)
        out = args.out or f"{Path(args.image).stem}_saliency.png"
        paths = [save_saliency(model, info, args.image, out, per_block=args.per_block, img_size=args.img_size)]
    for path in paths:
        print(f"wrote {path}")
    return 0


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


def _cmd_lm_train(args: argparse.Namespace) -> int:
    from esh.train.lm_job import SMOKE_TEST, train_lm

    training = {k: v for k, v in vars(args).items() if k in _LM_TRAIN_FLAGS and v is not None}
    if args.amp:
        training["use_amp"] = True
    if args.amp_dtype is not None:
        training["amp_dtype"] = args.amp_dtype
    if args.checkpointing:
        training["use_checkpoint"] = True
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


_LM_TRAIN_FLAGS = {
    # flag: (type, help); None keeps the default (or, with --resume, the saved run's value)
    "max_steps": (int, "optimizer steps (default 300: a few minutes on two CPU cores)"),
    "batch_size": (int, "sequences per step and process (default 16)"),
    "block_size": (int, "tokens per sequence (default 128)"),
    "lr": (float, "peak learning rate (default 1e-3, cosine to a tenth)"),
    "warmup_steps": (int, "linear warm-up steps (default 30)"),
    "gradient_accumulation_steps": (int, "micro-batches per optimizer step (default 1)"),
    "eval_interval": (int, "evaluate every N steps (default 100; 0: at the end only)"),
    "eval_iters": (int, "evaluation batches (default 16)"),
    "save_every": (int, "also checkpoint every N steps"),
    "out_dir": (str, "output directory (default runs/lm)"),
    "device": (str, "auto (default), cpu, cuda, cuda:1"),
    "seed": (int, "seed for everything (default 1337)"),
    "log": (str, "csv (always written), tensorboard or wandb"),
}


def _add_lm_parser(sub) -> None:
    lm = sub.add_parser("lm", help="ESH language model: train on text, generate")
    lm_sub = lm.add_subparsers(dest="lm_command", metavar="COMMAND", required=True)
    train = lm_sub.add_parser("train", help="train an ESH LM (default: tiny, byte-level, on the bundled Shakespeare)")
    train.add_argument("--config", default="tiny", choices=("tiny", "small", "medium", "large"))
    train.add_argument("--data", default="shakespeare", help="shakespeare (default), FILE, DIR of .txt, or hf:NAME")
    train.add_argument("--tokenizer", default="byte", help="byte (default), char, bpe[:VOCAB], or a tokenizer PATH")
    for name, (kind, text) in _LM_TRAIN_FLAGS.items():
        flag = "--out" if name == "out_dir" else "--" + name.replace("_", "-")
        train.add_argument(flag, dest=name, type=kind, help=text)
    _add_amp_arguments(train, "mixed precision")
    train.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (recompute blocks)")
    train.add_argument("--resume", help="an output directory of esh lm train to continue exactly")
    train.add_argument("--sample-tokens", type=int, default=200, help="tokens generated at the end (default 200)")
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


def _add_amp_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--amp`` and ``--amp-dtype``: one meaning wherever a command runs a model."""
    parser.add_argument("--amp", action="store_true", help=f"{what} (autocast; see --amp-dtype)")
    parser.add_argument(
        "--amp-dtype",
        choices=("bfloat16", "float16"),
        help="with --amp (default: bfloat16 on CPU and on GPUs that have it, Ampere and newer; else float16, "
        "with a gradient scaler when training on CUDA)",
    )


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that report bad input or a missing resource, shown as one line."""
    from esh.export import ExportError
    from esh.models._checkpoint import WeightsUnavailableError
    from esh.ops import BackendUnavailableError

    return (ExportError, WeightsUnavailableError, BackendUnavailableError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esh", description="Hybrid state-space / attention backbones.")
    parser.add_argument("--version", action="version", version=f"esh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    models = sub.add_parser("models", help="list registered models")
    models.add_argument("pattern", nargs="?", help="wildcard or substring, e.g. 'mambavision*' or 'vim'")
    models.set_defaults(func=_cmd_models)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="a name from `esh models`")
        p.add_argument("--checkpoint", help="weights: the authors' released file or an esh checkpoint")
        p.add_argument("--pretrained", action="store_true", help="download the released weights (needs network)")
        p.add_argument("--device", default="cpu")
        _add_amp_arguments(p, "mixed-precision inference")

    train = sub.add_parser("train", help="train a model (default: esh's hybrid on the embedded digits)")
    for name, (kind, text) in _TRAIN_FLAGS.items():
        train.add_argument("--" + name.replace("_", "-"), type=kind, help=text)
    for name, text in _TRAIN_SWITCHES.items():
        train.add_argument("--" + name.replace("_", "-"), action="store_true", help=text)
    _add_amp_arguments(train, "mixed-precision training")
    train.add_argument(
        "--no-aug", dest="augment", action="store_false", default=None, help="train on the evaluation transform"
    )
    train.add_argument(
        "--no-grad-checkpointing", action="store_true", help="never recompute blocks (ESH-Vision does by default)"
    )
    train.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="extra model-builder argument, repeatable (e.g. drop_path_rate=0.1)",
    )
    train.add_argument(
        "--ponder-warmup",
        type=int,
        help="ESH models: optimizer steps before the ponder cost enters the loss (the model's default: 15000)",
    )
    train.add_argument("--resume", help="an output directory (or its last.pth) to continue exactly")
    train.add_argument("--smoke-test", action="store_true", help="one epoch of at most 20 steps")
    train.set_defaults(func=_cmd_train)

    predict = sub.add_parser("predict", help="top-k ImageNet classes of images")
    model_args(predict)
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--topk", type=int, default=5)
    predict.set_defaults(func=_cmd_predict)

    evaluate = sub.add_parser("eval", help="top-1/top-5 accuracy on an ImageFolder directory")
    model_args(evaluate)
    evaluate.add_argument("--data", required=True, help="DIR/<class>/<image> (or DIR/val/<class>/...)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--workers", type=int, default=0)
    evaluate.add_argument("--img-size", type=int, help="evaluate at another resolution")
    evaluate.add_argument("--num-classes", type=int, help="for checkpoints with another head")
    evaluate.add_argument(
        "--routing", choices=("soft", "hard"), help="ESH models: the trained α blend, or hard per-patch routing"
    )
    evaluate.add_argument(
        "--attention-fraction", type=float, help="with --routing hard: attention for this share of patches per image"
    )
    evaluate.add_argument(
        "--exclusive",
        action="store_true",
        help="with --routing hard: one path per patch (the SSM scans only the patches not sent to attention)",
    )
    evaluate.set_defaults(func=_cmd_eval)

    info = sub.add_parser("info", help="parameters and multiply-adds of a model")
    info.add_argument("model", help="a name from `esh models`")
    info.add_argument("--img-size", type=int, help="default: the model's native resolution")
    info.set_defaults(func=_cmd_info)

    export = sub.add_parser("export", help="ONNX or TorchScript, checked against eager after writing")
    model_args(export)
    export.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    export.add_argument("--out", required=True)
    export.add_argument("--img-size", type=int, help="default: the model's native resolution")
    export.add_argument("--batch-size", type=int, default=1)
    export.set_defaults(func=_cmd_export)

    embed = sub.add_parser("embed", help="embed every image of a data set to a file")
    embed.add_argument("--model", required=True)
    embed.add_argument("--checkpoint")
    embed.add_argument("--data", required=True, help="DIR of class folders, FILE.npz, hf:NAME or digits")
    embed.add_argument("--out", required=True, help=".npy, .npz or .parquet")
    embed.add_argument("--layers", action="store_true", help="also one embedding per block (.npz/.parquet)")
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--device", default="cpu")
    _add_amp_arguments(embed, "mixed-precision inference")
    embed.set_defaults(func=_cmd_embed)

    align = sub.add_parser("align", help="alignment of two embeddings of the same items (MKNN, CKA)")
    align.add_argument("a", help="embeddings A: .npy, .npz or .parquet")
    align.add_argument("b", help="embeddings B, same items in the same order")
    align.add_argument("--metric", nargs="+", choices=("mknn", "cka", "cka-unbiased", "cknna"), default=["mknn", "cka"])
    align.add_argument("--k", type=int, default=10, help="neighbours for mknn and cknna (default 10)")
    align.add_argument(
        "--clip-quantile",
        type=float,
        help="clip outlier features to this quantile of |x| first (Huh et al. 2024 use 0.95; default: no clipping)",
    )
    align.add_argument(
        "--clip-mode",
        choices=("row-mean", "global"),
        default="row-mean",
        help="row-mean: mean of per-item quantiles (platonic-rep default); global: one quantile of all values",
    )
    align.add_argument("--column", help="parquet column or npz array holding the embeddings")
    align.add_argument("--layerwise", action="store_true", help="every layer_i of A against every layer_i of B")
    align.add_argument("--heatmap", help="with --layerwise: write the score matrix as a PNG")
    align.set_defaults(func=_cmd_align)

    saliency = sub.add_parser("saliency", help="α-saliency heatmaps: where an ESH model routes patches to attention")
    saliency.add_argument("--model", help="an ESH vision model (default: the checkpoint's; esh_vision_tiny for --demo)")
    saliency.add_argument("--checkpoint", help="weights (esh train's best.pth/last.pth); without: untrained weights")
    saliency.add_argument("--pretrained", action="store_true", help="download the released weights (needs network)")
    saliency.add_argument("--image", help="an image file (RGB or grey)")
    saliency.add_argument("--demo", action="store_true", help="the photographs that ship with scikit-image")
    saliency.add_argument("--out", help="PNG (default IMAGE_saliency.png), or with --demo a folder (saliency_demo)")
    saliency.add_argument("--per-block", action="store_true", help="also one map per block, not only per stage")
    saliency.add_argument("--img-size", type=int, help="model input size (default: the model's or the checkpoint's)")
    saliency.add_argument("--device", default="cpu")
    saliency.set_defaults(func=_cmd_saliency)

    _add_lm_parser(sub)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from esh.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # freed activations stay in the heap: no page faults per tensor (esh.runtime)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, OSError, *_user_errors()) as e:
        # bad input (a missing file, a checkpoint for another model, ...): one clear line
        print(f"esh {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
