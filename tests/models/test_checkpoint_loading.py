"""Loading checkpoints into the vision models: one-line errors for unreadable files, refused
integer weights, and fine-tuning onto another number of classes (a new head, nothing else
dropped)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

import esh
from esh.models import load_checkpoint
from esh.models._checkpoint import CheckpointError, ClassifierNote, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

VIM = dict(depth=1, embed_dim=8, img_size=32, d_state=4)


def _vim(**kw):
    return esh.create_model("vim_tiny", **{**VIM, **kw})


def _randomized(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


# --- unreadable files: one clear line each ---------------------------------------------------
def test_an_empty_file_says_it_is_empty(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes\)"):
        read_checkpoint(path)


def test_a_device_file_is_not_reported_missing():
    with pytest.raises(CheckpointError, match="not a regular file") as e:
        read_checkpoint("/dev/zero")
    assert "does not exist" not in str(e.value)


def test_an_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(1)}, path)
    # root reads any file, so the refusal is simulated where a real chmod would not show it
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(CheckpointError, match="permission denied") as e:
        read_checkpoint(path)
    assert "corrupt" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_an_unreadable_file_says_permission_denied_for_real(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(1)}, path)
    path.chmod(0)
    with pytest.raises(CheckpointError, match="permission denied"):
        read_checkpoint(path)


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_refused_pickle_names_the_class_and_never_advises_disabling_the_safety(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "hook": Payload()}, path)
    with pytest.raises(CheckpointError, match="allow-list") as e:
        read_checkpoint(path)
    message = str(e.value)
    assert "refers to print," in message
    assert "weights_only" not in message and "\n" not in message and "\x1b" not in message
    assert "must never run" not in capsys.readouterr().out


def test_random_bytes_are_a_checkpoint_error_with_a_reason(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(bytes(range(256)) * 3)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        read_checkpoint(path)
    assert not str(e.value).endswith(": ")


def test_a_checkpoint_with_non_string_keys_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({1: torch.zeros(1), (2, 3): "x"}, path)
    with pytest.raises(CheckpointError, match="no tensors"):
        esh.create_model("vim_tiny", checkpoint_path=str(path), **VIM)


# --- integer weights ------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_integer_weights_are_refused_naming_the_key_and_dtype(tmp_path, suffix):
    state = {k: (v * 100).long() if v.is_floating_point() else v for k, v in _vim().state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = _vim()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        CheckpointError, match=r"non-floating tensors \((cls_token|head\.bias|pos_embed) \(torch\.int64\)"
    ):
        load_checkpoint(model, path)
    for k, v in model.state_dict().items():  # nothing was half-loaded
        assert torch.equal(v, before[k])


def test_half_precision_weights_still_load(tmp_path):
    src = _randomized(_vim())
    torch.save({k: v.half() for k, v in src.state_dict().items()}, tmp_path / "w.pth")
    model = load_checkpoint(_vim(), tmp_path / "w.pth")
    torch.testing.assert_close(model.pos_embed, src.pos_embed.half().float())


# --- fine-tuning onto another number of classes ----------------------------------------------
@pytest.mark.parametrize("name", ["vim_tiny", "mambavision_nano", "esh_vision_nano"])
def test_a_checkpoint_with_another_head_loads_the_backbone_and_starts_a_new_head(tmp_path, name):
    small = VIM if name == "vim_tiny" else {}
    src = _randomized(esh.create_model(name, num_classes=1000, **small))
    path = tmp_path / "official.pth"
    torch.save({"model": src.state_dict()}, path)
    with pytest.warns(ClassifierNote, match=r"classifier \(head\.bias \(1000,\).*\(10,\).*starts new"):
        model = esh.create_model(name, checkpoint_path=str(path), num_classes=10, **small)
    assert model.get_classifier().out_features == 10
    theirs = src.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, theirs[k]), k


def test_only_the_classifier_is_ever_dropped(tmp_path):
    src = _vim(num_classes=1000).state_dict()
    src["pos_embed"] = src["pos_embed"][:, :, :4]  # a backbone key that does not fit
    torch.save(src, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"pos_embed: checkpoint \(1, 5, 4\)"):
        _vim(num_classes=10, checkpoint_path=str(tmp_path / "w.pth"))
    del src["pos_embed"]
    torch.save(src, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="1 missing keys.*pos_embed"):
        _vim(num_classes=10, checkpoint_path=str(tmp_path / "w.pth"))


def test_the_same_head_loads_without_a_note(tmp_path):
    src = _randomized(_vim(num_classes=7))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _vim(num_classes=7, checkpoint_path=str(tmp_path / "w.pth"))
    assert torch.equal(model.head.weight, src.head.weight)


def test_a_model_without_a_classifier_loads_a_checkpoint_with_one_quietly(tmp_path):
    src = _randomized(_vim(num_classes=1000))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _vim(num_classes=0, checkpoint_path=str(tmp_path / "w.pth"))
    assert torch.equal(model.pos_embed, src.pos_embed)


def test_ignore_classifier_loads_everything_but_the_head(tmp_path):
    src = _randomized(_vim(num_classes=5))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = _vim(num_classes=5)
    head = model.head.weight.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(model, tmp_path / "w.pth", ignore_classifier=True)
    assert torch.equal(model.head.weight, head)  # same shape, still not loaded
    assert torch.equal(model.pos_embed, src.pos_embed)
    built = _vim(num_classes=5, checkpoint_path=str(tmp_path / "w.pth"), ignore_classifier=True)
    assert not torch.equal(built.head.weight, src.head.weight)
    assert torch.equal(built.cls_token, src.cls_token)
