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
