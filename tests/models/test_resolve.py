"""esh.models.resolve: one way from a name (esh, else timm) and weights to a model, and what an
``esh train`` checkpoint tells predict/eval/export/saliency about the model it holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import esh
from esh._compat import import_timm
from esh.cli import main
from esh.errors import InputError
from esh.models.resolve import build_model, checkpoint_info, resolve_model
from esh.train.checkpoint import atomic_save

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["cat", "dog", "eel"]


def _esh_train_checkpoint(path, model: torch.nn.Module, arch: str, img_size: int | None, **extra) -> None:
    """The fields `esh train` writes (Trainer.state) that describe the model."""
    atomic_save(
        {
            "arch": arch,
            "model": model.state_dict(),
            "num_classes": len(CLASSES),
            "classes": list(CLASSES),
            "config": {"model": arch, "img_size": img_size, "model_kwargs": {}},
            **extra,
        },
        path,
    )


@pytest.fixture(scope="module")
def vim_checkpoint(tmp_path_factory):
    """A Vim-tiny trained at 32 px on 3 classes, as esh train saves it."""
    torch.manual_seed(0)
    model = esh.create_model("vim_tiny", img_size=32, num_classes=len(CLASSES)).eval()
    path = tmp_path_factory.mktemp("vim") / "best.pth"
    _esh_train_checkpoint(path, model, "vim_tiny", 32)
    return path, model


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory):
    """A timm ViT trained at 32 px on 3 classes by esh train."""
    torch.manual_seed(0)
    model = import_timm().create_model("test_vit", num_classes=len(CLASSES), img_size=32).eval()
    path = tmp_path_factory.mktemp("timm") / "best.pth"
    _esh_train_checkpoint(path, model, "test_vit", 32)
    return path, model


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name in CLASSES:
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        for j in range(2):
            p = folder / f"{j}.png"
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(p)
            paths.append(p)
    return tmp_path / "data", paths


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for k, v in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[k], v, rtol=0, atol=0)


def test_an_esh_train_checkpoint_names_its_model_classes_and_size(vim_checkpoint):
    path, trained = vim_checkpoint
    resolved = resolve_model(checkpoint_path=path)
    assert resolved.name == "vim_tiny" and resolved.class_names == CLASSES
    assert resolved.img_size == 32 and resolved.crop_pct == 1.0 and resolved.weights == "best.pth"
    assert resolved.model.num_classes == 3 and resolved.model.img_size == (32, 32)
    _same_weights(resolved.model, trained)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(resolved.model.eval()(x), trained(x))


def test_img_size_rebuilds_vim_for_that_size_with_the_position_embedding_resized(vim_checkpoint):
    path, _ = vim_checkpoint
    resolved = resolve_model(checkpoint_path=path, img_size=48)
    assert resolved.img_size == 48 and resolved.model.img_size == (48, 48)
    assert resolved.model.pretrained_cfg["input_size"] == (3, 48, 48)
    assert resolved.model.eval()(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_timm_names_resolve_like_esh_names(timm_checkpoint):
    path, trained = timm_checkpoint
    model = build_model("test_vit", num_classes=5, img_size=32)
    assert model.num_classes == 5 and model.patch_embed.img_size == (32, 32)
    resolved = resolve_model(checkpoint_path=path)  # model, classes and size from the checkpoint
    assert resolved.name == "test_vit" and resolved.class_names == CLASSES and resolved.img_size == 32
    _same_weights(resolved.model, trained)


def test_a_timm_checkpoint_is_read_with_the_safe_loader(tmp_path):
    torch.manual_seed(0)
    timm_model = import_timm().create_model("test_resnet", num_classes=4)
    torch.save({"state_dict": {f"module.{k}": v for k, v in timm_model.state_dict().items()}}, tmp_path / "w.pth")
    _same_weights(build_model("test_resnet", num_classes=4, checkpoint_path=tmp_path / "w.pth"), timm_model)

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"state_dict": timm_model.state_dict(), "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(InputError, match="refused to load"):
        build_model("test_resnet", num_classes=4, checkpoint_path=tmp_path / "evil.pth")


def test_a_timm_checkpoint_with_another_head_fine_tunes_onto_a_new_one(tmp_path):
    from esh.models._checkpoint import ClassifierNote

    torch.manual_seed(0)
    released = import_timm().create_model("test_resnet", num_classes=7)
    torch.save({"state_dict": released.state_dict()}, tmp_path / "w.pth")
    with pytest.warns(ClassifierNote, match="classifier"):
        model = build_model("test_resnet", num_classes=3, checkpoint_path=tmp_path / "w.pth")
    assert model.get_classifier().out_features == 3
    body = {k: v for k, v in released.state_dict().items() if not k.startswith("fc.")}
    for k, v in body.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_names_and_sizes_that_do_not_fit_are_one_line_input_errors(vim_checkpoint):
    path, _ = vim_checkpoint
    with pytest.raises(InputError, match="holds a vim_tiny trained by esh train, not a mambavision_t"):
        resolve_model("mambavision_t", checkpoint_path=path)
    with pytest.raises(InputError, match="name the model"):
        resolve_model()
    with pytest.raises(InputError, match="neither an esh model.*nor a timm model"):
        build_model("no_such_model_anywhere")
    with pytest.raises(InputError, match="img_size must be a positive integer"):
        build_model("test_vit", img_size=0)
    with pytest.raises(InputError, match="num_classes must be an integer >= 0"):
        build_model("test_vit", num_classes=-1)
    assert build_model("test_vit", num_classes=0).num_classes == 0  # features only, for embeddings
    with pytest.raises(InputError, match="timm's test_resnet does not take a model argument"):
        build_model("test_resnet", no_such_argument=1)


def test_hand_edited_metadata_counts_as_absent(tmp_path):
    torch.save({"arch": 3, "num_classes": -1, "classes": "abc", "config": None, "model": {}}, tmp_path / "odd.pth")
    info = checkpoint_info(tmp_path / "odd.pth")
    assert (info.arch, info.num_classes, info.class_names, info.img_size, info.model_kwargs) == (
        None,
        None,
        None,
        None,
        {},
    )


def test_cli_predict_prints_the_checkpoints_class_names(vim_checkpoint, images, capsys):
    path, _ = vim_checkpoint
    _, files = images
    assert main(["predict", "--checkpoint", str(path), "--topk", "3", str(files[0])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(files[0]) and len(lines) == 4
    assert sorted(line.split()[-1] for line in lines[1:]) == sorted(CLASSES)  # not ImageNet's "tench"


def test_cli_eval_runs_a_checkpoint_at_its_training_size_without_num_classes(vim_checkpoint, images, capsys):
    path, _ = vim_checkpoint
    data, _ = images
    assert main(["eval", "--checkpoint", str(path), "--data", str(data), "--batch-size", "6"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("vim_tiny: top-1") and "on 6 images at 32px" in out


def test_cli_commands_accept_timm_names(timm_checkpoint, images, tmp_path, capsys):
    path, _ = timm_checkpoint
    _, files = images
    assert main(["predict", "--model", "test_vit", "--num-classes", "3", "--img-size", "32", str(files[0])]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4  # 3 classes: top-3
    out = tmp_path / "vit.pt"
    assert main(["export", "--checkpoint", str(path), "--format", "torchscript", "--out", str(out)]) == 0
    assert "input 1x3x32x32" in capsys.readouterr().out and out.is_file()


def test_released_1000_class_weights_onto_another_head_start_it_new_with_a_one_line_note(images, tmp_path, capsys):
    torch.manual_seed(0)
    official = esh.create_model("vim_tiny", img_size=32)
    torch.save({"model": official.state_dict(), "epoch": 299}, tmp_path / "vim_t_official.pth")
    _, files = images
    argv = ["predict", "--model", "vim_tiny", "--img-size", "32", "--checkpoint", str(tmp_path / "vim_t_official.pth")]
    assert main([*argv, "--num-classes", "3", str(files[0])]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 4  # the image and its 3 classes
    notes = [line for line in captured.err.splitlines() if line.startswith("esh predict: note:")]
    assert len(notes) == 1 and "classifier" in notes[0] and "_builder.py" not in captured.err
