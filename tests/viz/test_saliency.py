"""α-saliency maps and pictures (esh.viz.saliency, `esh saliency`) on the real ESH-Vision model."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import esh
from esh.cli import main
from esh.inference import eval_transform
from esh.train.checkpoint import atomic_save
from esh.viz import alpha_maps, load_saliency_model, render_saliency, saliency_title, save_saliency
from esh.viz.saliency import UNTRAINED_NOTE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODEL = "esh_vision_nano"  # 6 blocks in 4 stages, 56x56 input


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return esh.create_model(MODEL).eval()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A real 48x64 RGB picture: a crop of the MNIST digits that ship with esh, tiled and tinted."""
    from esh.data.datasets import build_datasets

    train, _, _ = build_datasets("digits")
    digits = np.concatenate([np.concatenate(list(train.images[i : i + 2]), 0) for i in range(0, 6, 2)], 1)
    grey = np.asarray(Image.fromarray(digits).resize((64, 48)))
    return np.stack([grey, grey // 2, 255 - grey], -1).astype(np.uint8)


def _assert_png(path, min_bytes: int = 10_000) -> Image.Image:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes
    img = Image.open(path)
    img.load()
    return img


def test_one_map_per_block_and_per_stage_at_the_image_size(model, photo):
    maps = alpha_maps(model, photo, min_side=40)
    n_blocks = len(model.block_stage)
    # a 48x64 picture: the centred 48x48 square, kept at its own size (between min_side and max_side)
    assert maps["image"].shape == (48, 48, 3)
    assert maps["blocks"].shape == (n_blocks, 48, 48)
    assert maps["stages"].shape == (len(set(model.block_stage)), 48, 48)
    assert maps["block_stage"] == list(model.block_stage)
    assert [len(b) for b in maps["stage_blocks"]] == [
        model.block_stage.count(s) for s in sorted(set(model.block_stage))
    ]
    for m in (maps["blocks"], maps["stages"]):
        assert m.dtype == torch.float32 and torch.isfinite(m).all()
        assert m.min() >= 0 and m.max() <= 1
    assert maps["input_size"] == (3, 56, 56)
    assert maps["ponder_cost"] >= 1  # the block's own step counts
    assert maps["logits"].shape == (1000,)


def test_maps_are_the_block_maps_upsampled_bilinearly(model, photo):
    maps = alpha_maps(model, photo, min_side=100)
    # what the model saw: the centred square through its own evaluation transform
    square = Image.fromarray(photo[:, 8:56])
    x = eval_transform(model, crop_pct=1.0)(square)[None]
    with torch.inference_mode():
        out = model.forward_with_aux(x)
    assert maps["grids"] == [tuple(a.shape[1:]) for a in out["alphas"]]
    assert maps["grids"][0] == (14, 14)  # 56 / patch 4
    for i, alpha in enumerate(out["alphas"]):
        expected = F.interpolate(alpha[:, None], size=(100, 100), mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(maps["blocks"][i], expected)
        assert maps["block_means"][i] == pytest.approx(float(alpha.mean()), abs=1e-6)
    for s, idx in enumerate(maps["stage_blocks"]):
        torch.testing.assert_close(maps["stages"][s], maps["blocks"][idx].mean(0))


def test_small_images_are_drawn_at_min_side_and_large_ones_at_max_side(model):
    big = np.full((300, 400, 3), 128, np.uint8)
    assert alpha_maps(model, big, max_side=200)["blocks"].shape[-2:] == (200, 200)
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    maps = alpha_maps(model, digit)  # a grey image for an RGB model: converted, as esh train does
    assert maps["image"].shape == (256, 256, 3)
    assert maps["blocks"].shape[-2:] == (256, 256)


def test_grey_model_keeps_the_picture_grey():
    torch.manual_seed(0)
    grey_model = esh.create_model(MODEL, in_chans=1, num_classes=10).eval()
    grey_model.pretrained_cfg = {**grey_model.pretrained_cfg, "mean": (0.5,), "std": (0.5,)}
    maps = alpha_maps(grey_model, np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8), min_side=32)
    assert maps["image"].shape == (32, 32)
    assert maps["input_size"] == (1, 56, 56)


def test_model_is_left_in_the_mode_it_was_in(model, photo):
    model.train()
    try:
        alpha_maps(model, photo)
        assert model.training
    finally:
        model.eval()


def test_png_of_a_real_photo(model, tmp_path):
    data = pytest.importorskip("skimage.data")
    maps = alpha_maps(model, data.chelsea())
    title = saliency_title(MODEL, maps)
    out = render_saliency(maps["image"], maps, tmp_path / "chelsea.png", title=title)
    img = _assert_png(out, min_bytes=50_000)
    assert img.width > 4 * img.height / 2  # the image and 4 stage panels side by side
    assert img.text["Title"] == title
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chelsea.png"]  # no temporary file left


def test_png_of_an_image_file_per_block(model, photo, tmp_path):
    src = tmp_path / "digits.png"
    Image.fromarray(photo).save(src)
    model_info = {"name": MODEL, "weights": None, "class_names": None, "img_size": None}
    stages = _assert_png(save_saliency(model, model_info, src, tmp_path / "stages.png"))
    blocks = _assert_png(save_saliency(model, model_info, src, tmp_path / "blocks.png", per_block=True))
    assert blocks.height > 1.5 * stages.height  # rows of block maps under the stage row
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocks.png", "digits.png", "stages.png"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(model, photo, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    maps = alpha_maps(model, photo)
    out = tmp_path / "heat.png"
    out.write_bytes(b"previous")

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(OSError, match="disk full"):
        render_saliency(maps["image"], maps, out)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["heat.png"]


def test_untrained_title_says_what_the_maps_show(model, photo):
    maps = alpha_maps(model, photo)
    title = saliency_title(MODEL, maps)
    assert MODEL in title and UNTRAINED_NOTE in title
    assert "untrained weights" in UNTRAINED_NOTE and "not learned saliency" in UNTRAINED_NOTE
    trained = saliency_title(MODEL, maps, weights="best.pth", class_names=[f"c{i}" for i in range(1000)])
    assert "untrained" not in trained and "best.pth" in trained
    assert f"predicted c{int(maps['logits'].argmax())}" in trained


def _train_checkpoint(path, num_classes=10):
    """A checkpoint in the layout `esh train` writes (architecture, classes, config, weights)."""
    torch.manual_seed(1)
    trained = esh.create_model(MODEL, num_classes=num_classes)
    classes = [str(i) for i in range(num_classes)]
    atomic_save(
        {
            "arch": MODEL,
            "model": trained.state_dict(),
            "num_classes": num_classes,
            "classes": classes,
            "config": {"model": MODEL, "img_size": 48, "model_kwargs": {}},
        },
        path,
    )
    return trained


def test_an_esh_train_checkpoint_names_its_model_classes_and_size(photo, tmp_path):
    trained = _train_checkpoint(tmp_path / "best.pth")
    loaded, info = load_saliency_model(checkpoint_path=tmp_path / "best.pth")
    assert info == {"name": MODEL, "weights": "best.pth", "class_names": [str(i) for i in range(10)], "img_size": 48}
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    src = tmp_path / "digits.png"
    Image.fromarray(photo).save(src)
    out = save_saliency(loaded, info, src, tmp_path / "heat.png")
    title = Image.open(out).text["Title"]
    assert "best.pth" in title and "predicted" in title and "untrained" not in title
    with pytest.raises(ValueError, match="not a vim_tiny"):
        load_saliency_model("vim_tiny", tmp_path / "best.pth")


def test_cli_writes_the_png(photo, tmp_path, capsys):
    src = tmp_path / "digits.png"
    Image.fromarray(photo).save(src)
    out = tmp_path / "out" / "heat.png"
    assert main(["saliency", "--model", MODEL, "--image", str(src), "--out", str(out), "--img-size", "32"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    img = _assert_png(out)
    assert UNTRAINED_NOTE in img.text["Title"]


def test_cli_with_a_checkpoint_and_per_block(photo, tmp_path, capsys):
    _train_checkpoint(tmp_path / "last.pth")
    src = tmp_path / "digit.png"
    Image.fromarray(photo[..., 0]).save(src)  # grey file, RGB model
    out = tmp_path / "heat.png"
    assert (
        main(
            [
                "saliency",
                "--checkpoint",
                str(tmp_path / "last.pth"),
                "--image",
                str(src),
                "--out",
                str(out),
                "--per-block",
            ]
        )
        == 0
    )
    assert "last.pth" in _assert_png(out).text["Title"]


@pytest.mark.slow
def test_cli_demo_on_the_photographs_of_scikit_image(tmp_path, capsys):
    pytest.importorskip("skimage.data")
    assert main(["saliency", "--demo", "--model", MODEL, "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["saliency_astronaut.png", "saliency_chelsea.png", "saliency_coffee.png", "saliency_rocket.png"]
    for name in names:
        assert UNTRAINED_NOTE in _assert_png(tmp_path / name).text["Title"]
    assert len(capsys.readouterr().out.strip().splitlines()) == 4


def test_demo_draws_the_same_untrained_model_every_time(photo, tmp_path, monkeypatch):
    from esh.viz import saliency

    monkeypatch.setattr(saliency, "demo_photos", lambda: {"digits": photo})
    state = torch.get_rng_state()
    first = saliency.demo(tmp_path / "a", MODEL)
    second = saliency.demo(tmp_path / "b", MODEL)
    assert [p.name for p in first] == [p.name for p in second] == ["saliency_digits.png"]
    assert first[0].read_bytes() == second[0].read_bytes()
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched


def _one_line_error(capsys, argv, *fragments):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("esh saliency: error:")
    for fragment in fragments:
        assert fragment in err
    return err


def test_cli_missing_image_is_one_line(tmp_path, capsys):
    _one_line_error(capsys, ["saliency", "--model", MODEL, "--image", str(tmp_path / "nope.png")], "does not exist")


def test_cli_unreadable_image_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    _one_line_error(capsys, ["saliency", "--model", MODEL, "--image", str(bad)], "cannot read image")


def test_cli_model_without_routing_is_one_line(photo, tmp_path, capsys):
    src = tmp_path / "digits.png"
    Image.fromarray(photo).save(src)
    _one_line_error(capsys, ["saliency", "--model", "mambavision_nano", "--image", str(src)], "no α routing")


def test_cli_needs_an_image_or_demo_and_a_model(tmp_path, capsys):
    _one_line_error(capsys, ["saliency", "--model", MODEL], "--image IMG or --demo")
    _one_line_error(capsys, ["saliency", "--image", "x.png", "--demo"], "--image IMG or --demo")
    _one_line_error(capsys, ["saliency", "--image", "x.png"], "--model NAME")


def test_cli_demo_without_scikit_image_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    _one_line_error(capsys, ["saliency", "--demo", "--model", MODEL, "--out", str(tmp_path)], "esh[demo]")
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_raise_value_errors(model, photo, tmp_path):
    with pytest.raises(ValueError, match="uint8, or floating point in"):
        alpha_maps(model, photo.astype(np.float32))  # 0..255 floats
    with pytest.raises(ValueError, match=r"\(height, width, 3\)"):
        alpha_maps(model, np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(ValueError, match="file path, a PIL image or a numpy array"):
        alpha_maps(model, 3)
    with pytest.raises(ValueError, match="no α routing"):
        alpha_maps(esh.create_model("mambavision_nano"), photo)
    maps = alpha_maps(model, photo)
    with pytest.raises(ValueError, match="PNG"):
        render_saliency(maps["image"], maps, tmp_path / "heat.jpg")
