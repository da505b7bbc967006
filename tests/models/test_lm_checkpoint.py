"""ESH LM save_pretrained / from_pretrained: permissions under the user's umask, and weights of
the wrong kind or a config of the wrong types refused in one line."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from esh.errors import InputError
from esh.models.esh_lm import ESHConfig, ESHModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> ESHModel:
    torch.manual_seed(seed)
    return ESHModel(ESHConfig(vocab_size=53, d_model=16, n_layers=1, n_heads=2, expert_hidden=16))


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_saved_files_and_new_folders_take_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    target = tmp_path / "new" / "ckpt"  # a new folder, with a new parent
    _model().save_pretrained(target)
    assert _mode(target) == dir_mode and _mode(target.parent) == dir_mode
    assert _mode(target / "model.safetensors") == file_mode and _mode(target / "config.json") == file_mode
    # saving again into the existing folder: same modes, no temporary files left
    _model(1).save_pretrained(target)
    assert _mode(target / "model.safetensors") == file_mode and _mode(target / "config.json") == file_mode
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]


def test_integer_weights_are_refused_naming_the_key_and_dtype(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v.to(torch.int64) for k, v in state.items()}, tmp_path / "model.safetensors")
    with pytest.raises(InputError, match=r"embed_tokens\.weight is torch\.int64") as info:
        ESHModel.from_pretrained(tmp_path)
    assert "\n" not in str(info.value)
    # one integer tensor among floats is refused too, by name
    save_file({**state, "norm.weight": state["norm.weight"].to(torch.int32)}, tmp_path / "model.safetensors")
    with pytest.raises(InputError, match=r"norm\.weight is torch\.int32"):
        ESHModel.from_pretrained(tmp_path)
    # and through a safetensors file given as a checkpoint_path
    with pytest.raises(InputError, match=r"norm\.weight is torch\.int32"):
        from esh.models._lm_checkpoint import load_weights

        load_weights(_model(), tmp_path / "model.safetensors")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("d_model", "wide", "d_model must be a positive integer"),
        ("expert_hidden", "16", "expert_hidden must be a positive integer"),
        ("dropout", "none", "dropout must be a number"),
        ("capacity_factor", [1], "capacity_factor must be a number"),
        ("tie_embeddings", "yes", "tie_embeddings must be true or false"),
    ],
)
def test_a_config_json_with_a_wrong_field_type_is_a_one_line_error(tmp_path, field, value, message):
    _model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(InputError, match=message):
        ESHModel.from_pretrained(tmp_path)
