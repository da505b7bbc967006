"""predict / eval / info / export, through the library and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import esh
from esh.cli import main
from esh.export import export_model
from esh.inference import evaluate, predict
from esh.info import model_info
from esh.models import mambavision as mv

CFG = {
    "input_size": (3, 32, 32),
    "crop_pct": 1.0,
    "crop_mode": "center",
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "num_classes": 1000,
}


class FixedAnswer(nn.Module):
    """Always answers ImageNet class 0 (tench), then class 1."""

    pretrained_cfg = CFG
    num_classes = 1000

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 1000)
        logits[:, 0], logits[:, 1] = 3.0, 2.0
        return logits


def _write_images(folder, n, seed):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def image_folder(tmp_path):
    # folders named by ImageNet synset: tench (index 0) and goldfish (index 1)
    _write_images(tmp_path / "val" / "n01440764", 2, 0)
    _write_images(tmp_path / "val" / "n01443537", 3, 1)
    return tmp_path


def test_evaluate_counts_top1_and_top5(image_folder):
    result = evaluate(FixedAnswer(), image_folder, batch_size=2, progress=False)
    assert result == {"top1": pytest.approx(40.0), "top5": pytest.approx(100.0), "images": 5}


def test_evaluate_rejects_a_folder_that_does_not_fit_the_model(tmp_path):
    _write_images(tmp_path / "cats", 1, 0)
    _write_images(tmp_path / "dogs", 1, 1)
    with pytest.raises(ValueError, match="2 class folders.*1000 classes"):
        evaluate(FixedAnswer(), tmp_path, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        evaluate(FixedAnswer(), tmp_path / "nope", progress=False)


def test_predict_names_imagenet_classes(image_folder):
    paths = sorted((image_folder / "val" / "n01440764").iterdir())
    preds = predict(FixedAnswer(), paths, topk=3)
    assert len(preds) == 2 and len(preds[0]) == 3
    assert preds[0][0].name.startswith("tench") and preds[0][1].name.startswith("goldfish")
    probs = torch.tensor([3.0, 2.0] + [0.0] * 998).softmax(0)
    assert preds[0][0].probability == pytest.approx(float(probs[0]), rel=1e-5)


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        predict(FixedAnswer(), [bad])


def test_cli_predict_and_eval_on_mambavision(image_folder, capsys):
    image = sorted((image_folder / "val" / "n01440764").iterdir())[0]
    assert main(["predict", "--model", "mambavision_t", "--topk", "5", str(image)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(image) and len(lines) == 6 and all("%" in line for line in lines[1:])
    assert main(["eval", "--model", "mambavision_t", "--data", str(image_folder), "--batch-size", "4"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    code = main(["predict", "--model", "mambavision_t", "--checkpoint", str(tmp_path / "x.pth.tar"), "a.jpg"])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "name,gmacs,attention",
    [("mambavision_t", 4.46, 0.10), ("mambavision_s", 7.48, 0.10), ("mambavision_b", 14.95, 0.21)],
)
def test_info_matches_the_official_table(name, gmacs, attention):
    info = model_info(name)
    assert (
        info.params == sum(p.numel() for p in esh.create_model(name).parameters()) if name == "mambavision_t" else True
    )
    assert info.macs_matmul_conv / 1e9 == pytest.approx(gmacs, abs=0.02)
    assert info.macs_attention / 1e9 == pytest.approx(attention, abs=0.02)
    assert info.flops_scan > 0
    assert "GMACs" in info.format()


def test_info_counts_the_scan_from_its_shapes():
    info = model_info("mambavision_t")
    # stage 3: 4 mixers, 196 tokens, 160 channels; stage 4: 2 mixers, 49 tokens, 320 channels; N = 8
    expected = 9 * 8 * (4 * 196 * 160 + 2 * 49 * 320)
    assert info.flops_scan == expected


def _tiny():
    torch.manual_seed(0)
    model = mv.MambaVision(
        dim=16, in_dim=8, depths=(1, 1, 3, 2), num_heads=(1, 1, 2, 2), window_size=(8, 8, 4, 2), num_classes=10
    ).eval()
    model.pretrained_cfg = {**CFG, "num_classes": 10}
    return model


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_reproduces_eager(tmp_path, fmt):
    pytest.importorskip("onnxruntime") if fmt == "onnx" else None
    result = export_model(_tiny(), tmp_path / f"tiny.{fmt}", fmt, img_size=40)
    assert result.path.is_file() and result.max_rel_diff <= 1e-4
    assert not list(tmp_path.glob("*.tmp"))


def test_export_rejects_an_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="onnx"):
        export_model(_tiny(), tmp_path / "x", "tflite")


def test_counting_leaves_the_callers_model_untouched():
    from esh.info import count_model

    model = _tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = count_model(model, (3, 32, 32))
    assert info.params == sum(p.numel() for p in model.parameters()) and model.training
    assert all(v.device.type == "cpu" and torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _one_line(capsys, argv, *fragments) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"esh {argv[0]}: error:") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize("topk", ["0", "-1"])
def test_cli_predict_topk_below_one_is_one_line(image_folder, capsys, topk):
    image = str(sorted((image_folder / "val" / "n01440764").iterdir())[0])
    _one_line(capsys, ["predict", "--model", "mambavision_t", "--topk", topk, image], "--topk must be a positive")
    with pytest.raises(ValueError, match="topk must be a positive"):
        predict(FixedAnswer(), [image], topk=int(topk))


@pytest.mark.parametrize("command", ["predict", "eval", "saliency"])
def test_cli_devices_that_are_not_there_are_one_line(image_folder, capsys, monkeypatch, command):
    image = str(sorted((image_folder / "val" / "n01440764").iterdir())[0])
    extra = {"predict": [image], "eval": ["--data", str(image_folder)], "saliency": ["--image", image]}
    argv = [command, "--model", "esh_vision_nano", *extra[command]]
    _one_line(capsys, [*argv, "--device", "banana"], "unknown device 'banana'", "cpu, cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_line(capsys, [*argv, "--device", "cuda"], "no CUDA GPU", "--device cpu")


def test_cli_predict_refuses_an_image_above_the_pixel_limit(image_folder, capsys, monkeypatch):
    image = str(sorted((image_folder / "val" / "n01440764").iterdir())[0])
    monkeypatch.setenv("ESH_MAX_IMAGE_PIXELS", "100")  # the 48x40 test image is "too large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the loader sets PIL's limit too
    _one_line(capsys, ["predict", "--model", "mambavision_t", image], "decompression", "ESH_MAX_IMAGE_PIXELS")


def test_cli_predict_refuses_a_fifo_instead_of_waiting_on_it(tmp_path, capsys):
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    _one_line(capsys, ["predict", "--model", "mambavision_t", str(fifo)], "not a regular file")


def test_cli_export_without_onnx_names_the_install(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    out = tmp_path / "m.onnx"
    _one_line(capsys, ["export", "--model", "mambavision_t", "--out", str(out)], "pip install 'esh[onnx]'")
    assert not out.exists()


def test_esh_vision_onnx_export_is_refused_up_front_naming_the_operator(tmp_path, capsys, monkeypatch):
    import time

    traced = []
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: traced.append(1))
    out = tmp_path / "nano.onnx"
    start = time.perf_counter()
    err = _one_line(capsys, ["export", "--model", "esh_vision_nano", "--out", str(out)], "aten::unique_consecutive")
    assert "esh_vision_nano cannot be exported to ONNX" in err and "--format torchscript" in err
    assert traced == [] and not out.exists() and time.perf_counter() - start < 20


def test_a_failed_export_check_keeps_the_previous_file(tmp_path, monkeypatch):
    import esh.export

    out = tmp_path / "tiny.pt"
    out.write_bytes(b"previous")
    monkeypatch.setattr(esh.export, "_run_exported", lambda path, fmt, x: torch.zeros(x.shape[0], 10))
    with pytest.raises(esh.export.ExportError, match="was not written"):
        export_model(_tiny(), out, "torchscript", img_size=32)
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["tiny.pt"]


def test_export_takes_the_users_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        result = export_model(_tiny(), tmp_path / "tiny.pt", "torchscript", img_size=32)
    finally:
        os.umask(old)
    assert result.path.stat().st_mode & 0o777 == 0o644


class FixedThreeClasses(nn.Module):
    """Three outputs; always answers class 2."""

    pretrained_cfg = {**CFG, "num_classes": 3}
    num_classes = 3

    def forward(self, x):
        return torch.tensor([0.0, 1.0, 2.0]).expand(x.shape[0], 3)


def test_evaluate_matches_class_folders_to_the_models_class_names(tmp_path):
    _write_images(tmp_path / "eel", 2, 0)  # only one of the three classes, under its own name
    names = ["cat", "dog", "eel"]
    result = evaluate(FixedThreeClasses(), tmp_path, progress=False, class_names=names)
    assert result["top1"] == pytest.approx(100.0) and result["images"] == 2
    _write_images(tmp_path / "ant", 1, 1)
    with pytest.raises(ValueError, match="2 class folders"):  # "ant" is not one of the model's classes
        evaluate(FixedThreeClasses(), tmp_path, progress=False, class_names=names)


def test_evaluate_leaves_out_unreadable_images_with_a_warning_as_training_does(image_folder):
    (image_folder / "val" / "n01440764" / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="unreadable.*empty.jpg"):
        result = evaluate(FixedAnswer(), image_folder, batch_size=2, progress=False)
    assert result == {"top1": pytest.approx(40.0), "top5": pytest.approx(100.0), "images": 5}
