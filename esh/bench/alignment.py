"""Alignment metrics at scale: seconds and peak memory of MKNN (plain and outlier-clipped),
CKNNA and linear CKA (biased, unbiased) on n x d embeddings, one metric per fresh process so
that each peak is its own (Linux: the process's peak resident set, VmHWM).

The embeddings are random but related (B = A M / sqrt(d) + noise), seeded; the scores are
printed beside the times so runs can be compared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence

METRICS = ("mknn", "mknn-clipped", "cknna", "cka", "cka-unbiased")

_CHILD = """
import json, resource, time, torch
from esh.align import score
torch.manual_seed(0)
n, d, k, metric = {n}, {d}, {k}, {metric!r}
A = torch.randn(n, d)
B = A @ torch.randn(d, d) / d ** 0.5 + torch.randn(n, d)
name, clip = (metric[:-8], 0.95) if metric.endswith("-clipped") else (metric, None)
start = time.perf_counter()
value = score(A, B, name, k=k, clip_quantile=clip)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"metric": metric, "value": value, "seconds": seconds, "peak_bytes": peak}}))
"""


def run(n: int = 50_000, d: int = 768, k: int = 10, metrics: Sequence[str] = METRICS, threads: int = 2) -> list[dict]:
    rows = []
    for metric in metrics:
        code = _CHILD.format(n=n, d=d, k=k, metric=metric)
        env_threads = f"import torch; torch.set_num_threads({threads})\n"
        out = subprocess.run([sys.executable, "-c", env_threads + code], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{metric}: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"alignment metrics, n = {n:,}, d = {d}, k = {k}, {threads} threads (each metric in a fresh process)")
    print("| metric | value | seconds | process peak |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['metric']} | {r['value']:.4f} | {r['seconds']:.1f} | {r['peak_bytes'] / 2**30:.2f} GiB |")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    run(args.n, args.d, args.k, args.metrics, args.threads)
