"""``esh embed`` and ``esh align``: embeddings of a data set and their alignment."""

from __future__ import annotations

import argparse
from pathlib import Path

from esh.cli._common import add_amp_arguments
from esh.errors import InputError


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

    if args.heatmap and not args.layerwise:
        raise InputError("--heatmap draws the layer-by-layer scores: add --layerwise")
    if args.layerwise:
        if args.column:
            raise InputError("--column picks one array; --layerwise compares every layer_i array: give one of them")
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


def add_parsers(sub) -> None:
    embed = sub.add_parser("embed", help="embed every image of a data set to a file")
    embed.add_argument("--model", required=True)
    embed.add_argument("--checkpoint")
    embed.add_argument("--data", required=True, help="DIR of class folders, FILE.npz, hf:NAME or digits")
    embed.add_argument("--out", required=True, help=".npy, .npz or .parquet")
    embed.add_argument("--layers", action="store_true", help="also one embedding per block (.npz/.parquet)")
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--device", default="cpu")
    add_amp_arguments(embed, "mixed-precision inference")
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
