"""``esh models``, ``predict``, ``eval``, ``info``, ``export`` and ``saliency``: running a vision model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esh.cli import _common
from esh.cli._common import add_model_arguments
from esh.errors import InputError


def _cmd_models(args: argparse.Namespace) -> int:
    from esh.models import list_models

    names = list_models(args.pattern)
    if not names:
        what = f"matching {args.pattern!r}" if args.pattern else "registered"
        print(f"no models {what}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from esh.inference import predict

    _common.check_positive(args, "topk")
    device = _common.device(args)
    resolved = _common.load_model(args)
    results = predict(
        resolved.model,
        args.images,
        topk=args.topk,
        device=device,
        amp=args.amp,
        amp_dtype=args.amp_dtype,
        class_names=resolved.class_names,
        img_size=resolved.img_size,
        crop_pct=resolved.crop_pct,
    )
    for path, preds in zip(args.images, results):
        print(path)
        for p in preds:
            print(f"  {p.probability:7.2%}  {p.index:4d}  {p.name}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from esh.inference import evaluate

    _common.check_positive(args, "batch_size")
    if args.workers < 0:
        raise InputError(f"--workers must be 0 or more; got {args.workers}")
    device = _common.device(args)
    resolved = _common.load_model(args)
    model = resolved.model
    if args.routing is not None:  # ESH models: evaluate the blend, or the hard routing with real savings
        if not hasattr(model, "set_routing"):
            raise InputError(f"--routing needs a model with α routing (esh_vision_*); {resolved.name} has none")
        model.set_routing(args.routing, attention_fraction=args.attention_fraction, exclusive=args.exclusive)
    elif args.attention_fraction is not None or args.exclusive:
        raise InputError("--attention-fraction and --exclusive go with --routing hard")
    result = evaluate(
        model,
        args.data,
        batch_size=args.batch_size,
        device=device,
        amp=args.amp,
        workers=args.workers,
        img_size=resolved.img_size,
        amp_dtype=args.amp_dtype,
        crop_pct=resolved.crop_pct,
        class_names=resolved.class_names,
    )
    size = f" at {resolved.img_size}px" if resolved.img_size else ""
    print(
        f"{resolved.name}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  on {result['images']} images{size}"
    )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from esh.info import model_info

    print(model_info(args.model, img_size=args.img_size).format())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from esh.export import export_model

    _common.check_positive(args, "batch_size")
    resolved = _common.load_model(args)
    result = export_model(resolved.model, args.out, args.format, img_size=resolved.img_size, batch_size=args.batch_size)
    shape = "x".join(map(str, result.input_shape))
    diff = f"max relative difference to eager {result.max_rel_diff:.1e}"
    print(f"wrote {result.path} ({result.format}, input {shape}); {diff}")
    return 0


def _cmd_saliency(args: argparse.Namespace) -> int:
    from esh.viz.saliency import demo, load_saliency_model, save_saliency

    if args.demo == bool(args.image):
        raise InputError("give either --image IMG or --demo")
    _common.check_positive(args, "img_size")
    device = _common.device(args)
    if args.demo:
        paths = demo(args.out or "saliency_demo", args.model, args.checkpoint, args.per_block, args.img_size, device)
    else:
        model, info = load_saliency_model(args.model, args.checkpoint, args.pretrained, device)
        out = args.out or f"{Path(args.image).stem}_saliency.png"
        paths = [save_saliency(model, info, args.image, out, per_block=args.per_block, img_size=args.img_size)]
    for path in paths:
        print(f"wrote {path}")
    return 0


def add_parsers(sub) -> None:
    models = sub.add_parser("models", help="list registered models")
    models.add_argument("pattern", nargs="?", help="wildcard or substring, e.g. 'mambavision*' or 'vim'")
    models.set_defaults(func=_cmd_models)

    predict = sub.add_parser("predict", help="top-k classes of images (the checkpoint's names, else ImageNet's)")
    add_model_arguments(predict)
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--topk", type=int, default=5, help="classes shown per image (default: 5)")
    predict.set_defaults(func=_cmd_predict)

    evaluate = sub.add_parser("eval", help="top-1/top-5 accuracy on an ImageFolder directory")
    add_model_arguments(evaluate)
    evaluate.add_argument("--data", required=True, help="DIR/<class>/<image> (or DIR/val/<class>/...)")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--workers", type=int, default=0)
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

    export = sub.add_parser("export", help="ONNX or TorchScript (traced on the CPU), checked against eager")
    add_model_arguments(export, runs=False)
    export.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    export.add_argument("--out", required=True)
    export.add_argument("--batch-size", type=int, default=1)
    export.set_defaults(func=_cmd_export)

    saliency = sub.add_parser("saliency", help="α-saliency heatmaps: where an ESH model routes patches to attention")
    saliency.add_argument("--model", help="an ESH vision model (default: the checkpoint's; esh_vision_tiny for --demo)")
    saliency.add_argument("--checkpoint", help="weights (esh train's best.pth/last.pth); without: untrained weights")
    saliency.add_argument("--pretrained", action="store_true", help="download the released weights (needs network)")
    saliency.add_argument("--image", help="an image file (RGB or grey)")
    saliency.add_argument("--demo", action="store_true", help="the photographs that ship with scikit-image")
    saliency.add_argument("--out", help="PNG (default IMAGE_saliency.png), or with --demo a folder (saliency_demo)")
    saliency.add_argument("--per-block", action="store_true", help="also one map per block, not only per stage")
    saliency.add_argument("--img-size", type=int, help="model input size (default: the model's or the checkpoint's)")
    _common.add_device_argument(saliency)
    saliency.set_defaults(func=_cmd_saliency)
