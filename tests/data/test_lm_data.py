"""LM corpus, split, tokenizers and token-block data sets."""

from __future__ import annotations

import pytest
import torch

from esh.data.text import (
    SHAKESPEARE_CHARS,
    SHAKESPEARE_SYMBOLS,
    ContiguousBlockDataset,
    RandomBlockDataset,
    bits_per_unit,
    load_corpus,
    prepare_lm_data,
    split_corpus,
)
from esh.data.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_path,
)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20


def test_bundled_corpus_has_the_documented_size_and_symbols():
    text = load_corpus()
    assert len(text) == SHAKESPEARE_CHARS == 5_057_198
    assert len(set(text)) == SHAKESPEARE_SYMBOLS == 84
    assert text.isascii()
    assert text.startswith("ALL'S WELL THAT ENDS WELL")  # files in sorted name order


def test_split_is_by_position_first_ninety_percent_train():
    train, val = split_corpus(TEXT)
    assert train + val == TEXT
    assert len(train) == int(len(TEXT) * 0.9)
    with pytest.raises(ValueError, match="val_fraction"):
        split_corpus(TEXT, 1.0)


def test_corpus_from_file_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta\n")
    (tmp_path / "ignored.md").write_text("not text data")
    assert load_corpus(tmp_path / "a.txt") == "alpha"
    assert load_corpus(tmp_path) == "alpha\nbeta\n"


def test_corpus_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(tmp_path / "empty.txt")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        load_corpus(tmp_path / "d")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="UTF-8"):
        load_corpus(tmp_path / "bin.txt")


def test_corpus_from_a_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["one", "two"], "n": [1, 2]}),
            "test": datasets.Dataset.from_dict({"text": ["three"], "n": [3]}),
        }
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_corpus(f"hf:{tmp_path / 'ds'}") == "one\ntwo\nthree"


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "héllo wörld ✓\n"
    assert tok.vocab_size == 256
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_tensor(text).tolist() == tok.encode(text)


def test_char_tokenizer_round_trips_and_refuses_unknown_characters():
    tok = build_tokenizer("char", TEXT)
    assert isinstance(tok, CharTokenizer)
    assert tok.vocab_size == len(set(TEXT))
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.encode("aA") == [tok.chars.index("a"), tok.chars.index("A")]
    with pytest.raises(ValueError, match="outside"):
        tok.encode("z€")


def test_bpe_tokenizer_trains_offline_and_round_trips():
    pytest.importorskip("tokenizers")
    tok = build_tokenizer("bpe:300", TEXT)
    assert tok.vocab_size == 300
    assert tok.eos_token_id is not None
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT.encode("utf-8")) / 2  # merges learned
    assert tok.decode(ids) == TEXT
    assert tok.encode_tensor(TEXT).tolist() == ids  # chunked encoding == whole-text encoding
    unseen = "Zebras ünd ✓ 123"
    assert tok.decode(tok.encode(unseen)) == unseen  # byte-level: nothing is out of vocabulary


@pytest.mark.parametrize("spec", ["byte", "char", "bpe:300"])
def test_tokenizers_save_and_load_from_a_directory(tmp_path, spec):
    if spec.startswith("bpe"):
        pytest.importorskip("tokenizers")
    tok = build_tokenizer(spec, TEXT)
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert type(again) is type(tok)
    assert again.vocab_size == tok.vocab_size
    assert again.encode(TEXT[:200]) == tok.encode(TEXT[:200])


@pytest.mark.parametrize(
    "content, message",
    [
        ({"kind": "char", "chars": 5}, "field 'chars' must be a string; got int"),
        ({"kind": "char", "chars": ["a", "b"]}, "field 'chars' must be a string; got list"),
        ({"kind": "char"}, "no 'chars' field"),
        ({"kind": 3}, "field 'kind' must be a string; got int"),
        ({"chars": "ab"}, "no 'kind' field"),
        (["byte"], "holds a JSON list"),
    ],
)
def test_a_tokenizer_file_with_a_wrong_field_is_a_one_line_error_naming_it(tmp_path, content, message):
    import json

    from esh.errors import InputError

    (tmp_path / "esh_tokenizer.json").write_text(json.dumps(content))
    with pytest.raises(InputError, match=message) as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


def test_saved_tokenizer_files_take_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        build_tokenizer("char", TEXT).save(tmp_path / "tok")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "tok" / "esh_tokenizer.json").st_mode) == 0o644


def test_user_tokenizer_json_is_accepted(tmp_path):
    pytest.importorskip("tokenizers")
    bpe = build_tokenizer("bpe:280", TEXT)
    (tmp_path / "tokenizer.json").write_text(bpe.tokenizer.to_str())
    for path in (tmp_path / "tokenizer.json", tmp_path):
        tok = tokenizer_from_path(path)
        assert tok.encode(TEXT[:100]) == bpe.encode(TEXT[:100])
    with pytest.raises(ValueError, match="expected byte, char"):
        build_tokenizer(str(tmp_path / "nope"), TEXT)


def test_random_blocks_are_deterministic_per_seed_and_epoch():
    tokens = torch.arange(1000)
    a, b = (
        RandomBlockDataset(tokens, 16, num_samples=50, seed=3),
        RandomBlockDataset(tokens, 16, num_samples=50, seed=3),
    )
    windows = [a[i] for i in range(50)]
    assert all(torch.equal(w, b[i]) for i, w in enumerate(windows))
    assert all(len(w) == 17 and torch.equal(w, torch.arange(w[0], w[0] + 17)) for w in windows)
    assert torch.equal(a[7], a[7])  # random access: the same window whatever was read before
    a.set_epoch(1)
    assert not all(torch.equal(a[i], w) for i, w in enumerate(windows))
    other = RandomBlockDataset(tokens, 16, num_samples=50, seed=4)
    assert not all(torch.equal(other[i], w) for i, w in enumerate(windows))


def test_contiguous_blocks_predict_every_token_once():
    tokens = torch.arange(101)
    ds = ContiguousBlockDataset(tokens, 10)
    assert len(ds) == 10
    targets = torch.cat([ds[i][1:] for i in range(len(ds))])
    assert torch.equal(targets, tokens[1:])


def test_block_size_larger_than_the_split_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        RandomBlockDataset(torch.arange(10), 16)
    with pytest.raises(ValueError, match="block_size"):
        ContiguousBlockDataset(torch.arange(10), 10)


def test_prepare_lm_data_counts_bytes_per_token(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT + "é")
    data = prepare_lm_data(path, "byte")
    assert len(data.train) + len(data.val) == len((TEXT + "é").encode("utf-8"))
    assert data.val_bytes_per_token == 1.0
    assert data.val_chars_per_token < 1.0  # the two-byte character is in the validation split
    assert bits_per_unit(2.0, 100, 50) == pytest.approx(2 * 2.0 / 0.6931471805599453)
