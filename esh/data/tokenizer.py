"""Tokenizers for the language models: byte-level (the default), character-level, a byte-level
BPE trained offline on the corpus, and any Hugging Face tokenizer a user has on disk.

Every tokenizer has ``vocab_size``, ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``encode_tensor(text)`` (a 1-D int64 tensor, fast for a whole corpus) and ``save(directory)``;
``load_tokenizer(directory)`` reads back what ``save`` wrote (esh keeps it in the checkpoint
directory, next to the model). ``build_tokenizer(spec, text)`` makes one from a command-line
spec: ``byte``, ``char``, ``bpe`` / ``bpe:VOCAB`` or a path.

Byte-level ids are the UTF-8 bytes (vocabulary 256), so bits per token are bits per byte, and
for an ASCII corpus bits per character.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from esh._compat import has_module, require
from esh._io import write_text
from esh.errors import InputError

CONFIG_FILE = "esh_tokenizer.json"  # which kind, and the vocabulary of the small ones
HF_FILE = "tokenizer.json"  # the Hugging Face `tokenizers` file (BPE and user tokenizers)
DEFAULT_BPE_VOCAB = 4096
EOS_TOKEN = "<|endoftext|>"


class Tokenizer(ABC):
    """Text <-> token ids."""

    kind: str
    vocab_size: int
    eos_token_id: int | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_tensor(self, text: str) -> torch.Tensor:
        """All ids of ``text`` as a 1-D int64 tensor."""
        return torch.tensor(self.encode(text), dtype=torch.long)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer into ``directory`` (created if needed); ``load_tokenizer`` reads it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_files(directory)
        write_text(directory / CONFIG_FILE, json.dumps({"kind": self.kind, **self._config()}, indent=1))

    def _config(self) -> dict:
        return {}

    def _save_files(self, directory: Path) -> None:  # noqa: B027  (the small tokenizers need no file)
        """Files besides esh_tokenizer.json."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0-255. Decoding replaces byte sequences that are not valid UTF-8."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if any(i < 0 or i > 255 for i in ids):
            raise InputError(f"byte-level ids must lie in [0, 255]; got {min(ids)}..{max(ids)}")
        return bytes(ids).decode("utf-8", errors="replace")


class CharTokenizer(Tokenizer):
    """One id per distinct character of the training text, in sorted order (nanoGPT's
    shakespeare_char). Text with a character outside the vocabulary is refused."""

    kind = "char"

    def __init__(self, chars: str):
        if not chars:
            raise InputError("a character vocabulary needs at least one character")
        if len(set(chars)) != len(chars):
            raise InputError("the character vocabulary has repeated characters")
        self.chars = chars
        self.vocab_size = len(chars)
        codes = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
        self._lookup = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
        self._lookup[codes] = np.arange(len(chars))

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode_tensor(self, text: str) -> torch.Tensor:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.where(codes < len(self._lookup), self._lookup[np.minimum(codes, len(self._lookup) - 1)], -1)
        if (ids < 0).any():
            unknown = sorted({chr(c) for c in codes[ids < 0].tolist()})
            raise InputError(
                f"characters outside the {self.vocab_size}-symbol vocabulary: {''.join(unknown)!r} "
                "(a char-level model only knows the characters of its training text)"
            )
        return torch.from_numpy(ids)

    def encode(self, text: str) -> list[int]:
        return self.encode_tensor(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return "".join(self.chars[int(i)] for i in ids)
        except IndexError:
            raise InputError(f"char-level ids must lie in [0, {self.vocab_size - 1}]") from None

    def _config(self) -> dict:
        return {"chars": self.chars}


def _line_chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    """Pieces of about ``size`` characters cut after a newline that is followed by a
    non-space character: byte-level pre-tokenisation never joins across such a point, so
    encoding the pieces gives the ids of encoding the whole text."""
    start = 0
    while start < len(text):
        cut = start + size
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        yield text[start:cut]
        start = cut


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer``: esh's trained BPE, or a user's ``tokenizer.json``."""

    def __init__(self, tokenizer, kind: str = "hf"):
        self.tokenizer, self.kind = tokenizer, kind
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = tokenizer.token_to_id(EOS_TOKEN)

    @classmethod
    def train_bpe(cls, text: str, vocab_size: int = DEFAULT_BPE_VOCAB) -> HFTokenizer:
        """A byte-level BPE (GPT-2's pre-tokenisation, every byte in the base alphabet, so any
        text encodes) with ``vocab_size`` ids including the ``<|endoftext|>`` token, trained on ``text``."""
        if vocab_size < 257 + 1:
            raise InputError(f"a byte-level BPE needs vocab_size > 257 (256 bytes + {EOS_TOKEN}); got {vocab_size}")
        tk = require("tokenizers", "lm", "the BPE tokenizer")
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[EOS_TOKEN],
            show_progress=False,
        )
        tok.train_from_iterator(_line_chunks(text), trainer, length=None)
        return cls(tok, kind="bpe")

    @classmethod
    def from_file(cls, path: str | os.PathLike, kind: str = "hf") -> HFTokenizer:
        tk = require("tokenizers", "lm", "a tokenizer.json tokenizer")
        try:
            return cls(tk.Tokenizer.from_file(str(path)), kind=kind)
        except Exception as e:  # tokenizers raises its own Exception type on bad files
            raise InputError(f"{path} is not a Hugging Face tokenizer.json file: {e}") from e

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_tensor(self, text: str) -> torch.Tensor:
        pieces = self.tokenizer.encode_batch(list(_line_chunks(text)), add_special_tokens=False)
        return torch.tensor([i for p in pieces for i in p.ids], dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _save_files(self, directory: Path) -> None:
        write_text(directory / HF_FILE, self.tokenizer.to_str())


class TransformersTokenizer(Tokenizer):
    """Any tokenizer ``transformers.AutoTokenizer`` loads from a local directory."""

    kind = "transformers"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> TransformersTokenizer:
        transformers = require("transformers", "hf", "a transformers tokenizer directory")
        try:
            return cls(transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True))
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: transformers.AutoTokenizer could not load a tokenizer from it: {e}") from e

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def _save_files(self, directory: Path) -> None:
        self.tokenizer.save_pretrained(str(directory))


def tokenizer_from_path(path: str | os.PathLike) -> Tokenizer:
    """A user's tokenizer: an esh tokenizer directory, a ``tokenizer.json`` file or a directory
    holding one, or (with ``transformers`` installed) any local ``AutoTokenizer`` directory."""
    p = Path(path)
    if p.is_dir() and (p / CONFIG_FILE).is_file():
        return load_tokenizer(p)
    if p.is_file():
        return HFTokenizer.from_file(p)
    if p.is_dir() and (p / HF_FILE).is_file():
        return HFTokenizer.from_file(p / HF_FILE)
    if p.is_dir() and has_module("transformers"):
        return TransformersTokenizer.from_pretrained(p)
    if p.is_dir():
        raise InputError(f"{p} holds no tokenizer.json (install transformers to load other tokenizer formats)")
    raise InputError(f"tokenizer {str(path)!r}: expected byte, char, bpe, bpe:VOCAB, or a tokenizer file/directory")


def build_tokenizer(spec: str, text: str = "") -> Tokenizer:
    """``byte``; ``char`` (vocabulary from ``text``); ``bpe`` or ``bpe:VOCAB`` (trained on
    ``text``, 4096 ids by default); or a path (see ``tokenizer_from_path``)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "char":
        if not text:
            raise InputError("a char-level tokenizer is built from the training text, which is empty")
        return CharTokenizer.from_text(text)
    if spec == "bpe" or spec.startswith("bpe:"):
        size = spec.partition(":")[2]
        if size and not size.isdigit():
            raise InputError(f"tokenizer {spec!r}: expected bpe:VOCAB_SIZE, e.g. bpe:4096")
        if not text:
            raise InputError("a BPE tokenizer is trained on the training text, which is empty")
        return HFTokenizer.train_bpe(text, int(size) if size else DEFAULT_BPE_VOCAB)
    return tokenizer_from_path(spec)


def _field(config: dict, name: str, path: Path) -> str:
    """The string ``config[name]``, or a one-line error naming the field."""
    if name not in config:
        raise InputError(f"{path} has no {name!r} field; expected a string there")
    value = config[name]
    if not isinstance(value, str):
        raise InputError(f"{path}: field {name!r} must be a string; got {type(value).__name__} {value!r:.60}")
    return value


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer that ``Tokenizer.save(directory)`` wrote."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise InputError(f"{directory} has no {CONFIG_FILE}: not a directory written by an esh tokenizer")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{config_path} is not a valid esh tokenizer file: {e}") from e
    if not isinstance(config, dict):
        raise InputError(f"{config_path} holds a JSON {type(config).__name__}; expected an object with a 'kind' field")
    kind = _field(config, "kind", config_path)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(_field(config, "chars", config_path))
    if kind in ("bpe", "hf"):
        return HFTokenizer.from_file(directory / HF_FILE, kind=kind)
    if kind == "transformers":
        return TransformersTokenizer.from_pretrained(directory)
    raise InputError(f"{config_path}: unknown tokenizer kind {kind!r}")
