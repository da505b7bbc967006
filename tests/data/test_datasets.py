"""Data sets: .npz files checked for counts, shapes, dtypes and values; class folders without
unreadable images in the index."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from esh.data.datasets import ImageFolderDataset, build_datasets, load_npz
from esh.errors import InputError


def _save(tmp_path, images, labels, name="d.npz") -> str:
    np.savez(tmp_path / name, images=images, labels=labels)
    return str(tmp_path / name)


def _digits(n: int = 40) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 8, 8), dtype=np.uint8)


def test_npz_with_fewer_labels_than_images_is_refused(tmp_path):
    path = _save(tmp_path, _digits(40), np.arange(5) % 2)
    with pytest.raises(InputError, match="40 images but 5 labels"):
        build_datasets(path)


def test_npz_float_images_in_unit_range_are_scaled_not_blackened(tmp_path):
    pixels = _digits(40)
    path = _save(tmp_path, pixels.astype(np.float32) / 255, np.arange(40) % 2)
    images, labels, names = load_npz(path)
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(images, pixels)  # astype(uint8) made every image black
    train, val, classes = build_datasets(path)
    assert len(train) + len(val) == 40 and classes == ["0", "1"]
    assert np.asarray(train[0][0]).max() > 0


def test_npz_16bit_images_are_scaled(tmp_path):
    path = _save(tmp_path, (_digits(4).astype(np.uint16) * 257), np.zeros(4, np.int64))
    np.testing.assert_array_equal(load_npz(path)[0], _digits(4))


@pytest.mark.parametrize(
    "images,labels,message",
    [
        (np.zeros((4, 8, 8, 5), np.uint8), np.zeros(4, np.int64), "1, 3 or 4 channels last"),
        (np.zeros((4, 3, 8, 8), np.uint8), np.zeros(4, np.int64), "channels first"),
        (np.zeros((4, 8), np.uint8), np.zeros(4, np.int64), "got images"),
        (np.zeros((4, 8, 8), np.uint8), np.zeros((4, 2), np.int64), "got images"),
        (np.zeros((4, 8, 8), np.uint8), np.array([0.5, 1, 2, 3]), "whole numbers"),
        (np.zeros((4, 8, 8), np.uint8), np.array(["a", "b", "c", "d"]), "whole numbers"),
        (np.zeros((4, 8, 8), np.uint8), np.array([0, 1, -1, 2]), ">= 0"),
        (np.full((4, 8, 8), np.nan, np.float32), np.zeros(4, np.int64), "NaN"),
        (np.zeros((0, 8, 8), np.uint8), np.zeros(0, np.int64), "no images"),
        (np.array([["a"] * 8] * 8 * 4).reshape(4, 8, 8), np.zeros(4, np.int64), "integer or float pixels"),
    ],
)
def test_npz_that_does_not_fit_is_refused_with_the_reason(tmp_path, images, labels, message):
    with pytest.raises(InputError, match=message):
        build_datasets(_save(tmp_path, images, labels))


def test_npz_missing_arrays_or_not_an_npz(tmp_path):
    np.savez(tmp_path / "x.npz", pictures=np.zeros((2, 4, 4)))
    with pytest.raises(InputError, match="no images or labels"):
        build_datasets(str(tmp_path / "x.npz"))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match="expected a .npz file"):
        build_datasets(str(tmp_path / "junk.npz"))
    with pytest.raises(InputError, match="does not exist"):
        build_datasets(str(tmp_path / "none.npz"))


def test_npz_labels_become_classes_in_sorted_order(tmp_path):
    path = _save(tmp_path, _digits(20), np.array([3, 7] * 10))
    _, labels, names = load_npz(path)
    assert names == ["3", "7"] and set(labels.tolist()) == {0, 1}
    rgb = _save(tmp_path, np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4, np.int64), name="one_channel.npz")
    assert load_npz(rgb)[0].shape == (4, 8, 8)


def test_image_folder_leaves_unreadable_images_out_of_the_index(tmp_path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8), (30, 60, 90)).save(tmp_path / split / cls / "ok.png")
    (tmp_path / "train" / "a" / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping unreadable image files: 1 of 3"):
        train, val, classes = build_datasets(str(tmp_path))
    assert len(train) == 2 and len(val) == 2 and classes == ["a", "b"]
    assert [train[i][1] for i in range(len(train))] == [0, 1]
    assert [p.rsplit("/", 1)[-1] for p, _ in train.skipped] == ["empty.jpg"]


def test_image_folder_file_broken_after_the_scan_is_an_error_naming_it(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    ds = ImageFolderDataset(tmp_path)
    (tmp_path / "a" / "x.png").write_bytes(b"")
    with pytest.raises(InputError, match="x.png"):
        ds[0]


def test_hf_images_of_16_bits_are_scaled():
    from esh.data.datasets import HFDataset

    rows = [{"image": Image.fromarray(np.full((4, 4), 100 * 257, np.uint16)), "label": 0}]
    img, label = HFDataset(rows, "image", "label")[0]
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (100, 100, 100) and label == 0  # clipping: 255
