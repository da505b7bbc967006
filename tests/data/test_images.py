"""esh.data.images: one loader that scales high-bit-depth pixels, refuses bombs and
non-regular files, and names the file in every error; the up-front folder scan."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from esh.data.images import MAX_PIXELS_ENV, array_to_uint8, load_image, scan_image_folder
from esh.errors import InputError


def _png_rgb16(path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.abs(out[..., 0].astype(int) - np.rint(ramp / 257)).max() <= 1
    assert (out == 255).mean() < 0.01  # clipping made 99.5% of it white


def test_16bit_rgb_png_keeps_its_colours(tmp_path):
    px = np.zeros((8, 8, 3), np.uint16)
    px[..., 0], px[..., 1], px[..., 2] = 65535, 32896, 0
    _png_rgb16(tmp_path / "rgb16.png", px)
    out = np.asarray(load_image(tmp_path / "rgb16.png"))
    assert np.abs(out[0, 0].astype(int) - [255, 128, 0]).max() <= 1


def test_float_tiff_in_unit_range_is_scaled(tmp_path):
    img = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(img).save(tmp_path / "f.tif")
    out = np.asarray(load_image(tmp_path / "f.tif", mode="L"))
    assert out.min() == 0 and out.max() == 255  # PIL's convert makes it all black
    assert np.abs(out.astype(int) - np.rint(img * 255)).max() <= 1


def test_float_tiff_outside_0_255_is_stretched(tmp_path):
    img = np.linspace(-1000, 3000, 16 * 16, dtype=np.float32).reshape(16, 16)
    Image.fromarray(img).save(tmp_path / "f.tif")
    out = np.asarray(load_image(tmp_path / "f.tif", mode="L"))
    assert out.min() == 0 and out.max() == 255 and out[8, 8] not in (0, 255)


def test_array_to_uint8_rules():
    assert array_to_uint8(np.array([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]
    assert array_to_uint8(np.array([0.0, 200.0])).tolist() == [0, 200]
    assert array_to_uint8(np.array([0, 65535], np.uint16)).tolist() == [0, 255]
    assert array_to_uint8(np.array([3, 250], np.int64)).tolist() == [3, 250]
    with pytest.raises(InputError, match="NaN"):
        array_to_uint8(np.array([0.0, np.nan]))
    with pytest.raises(InputError, match="dtype"):
        array_to_uint8(np.array(["a"]))


def test_palette_with_transparency_loads_without_a_warning(tmp_path, recwarn):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (255, 0, 0)
    assert not [w for w in recwarn if "Palette" in str(w.message)]


@pytest.fixture
def restore_pil_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


def test_decompression_bomb_refused_with_how_to_allow(tmp_path, monkeypatch, restore_pil_limit):
    Image.new("L", (20, 20)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 400 pixels: PIL's own error (over twice the limit)
    with pytest.raises(InputError, match=f"big.png has 400 pixels.*{MAX_PIXELS_ENV}"):
        load_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 pixels: only PIL's warning; refused all the same
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(tmp_path / "big.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "0")
    assert load_image(tmp_path / "big.png").size == (20, 20)
    monkeypatch.setenv(MAX_PIXELS_ENV, "399")
    with pytest.raises(InputError, match="limit of 399"):
        load_image(tmp_path / "big.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(InputError, match=MAX_PIXELS_ENV):
        load_image(tmp_path / "big.png")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(InputError, match="pipe.png is not a regular file"):
        load_image(tmp_path / "pipe.png")


def test_device_and_directory_refused(tmp_path):
    if os.path.exists("/dev/zero"):
        with pytest.raises(InputError, match="not a regular file"):
            load_image("/dev/zero")
    with pytest.raises(InputError, match="is a directory"):
        load_image(tmp_path)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.jpg", b"", "empty"),
        ("text.png", b"hello, not an image", "not an image file"),
        ("cut.png", _png_bytes()[:200], "truncated or corrupt"),
    ],
)
def test_unreadable_file_names_the_path(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=f"{name}.*{message}|{message}.*{name}"):
        load_image(tmp_path / name)


def test_truncated_jpeg_refused_also_in_the_fast_check(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for draft in (False, True):
        with pytest.raises(InputError, match="cut.jpg: truncated or corrupt"):
            load_image(tmp_path / "cut.jpg", draft=draft)


def test_missing_and_unreadable_permission(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "locked.png").write_bytes(_png_bytes())
    os.chmod(tmp_path / "locked.png", 0)
    if os.access(tmp_path / "locked.png", os.R_OK):
        pytest.skip("running as root: permissions are not enforced")
    with pytest.raises(InputError, match="locked.png: permission denied"):
        load_image(tmp_path / "locked.png")


def test_scan_keeps_readable_images_and_counts_the_rest(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a" / "x.png")
    Image.new("RGB", (8, 8), (40, 50, 60)).save(tmp_path / "b" / "y.jpg")
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    (tmp_path / "b" / "cut.png").write_bytes(_png_bytes()[:100])
    (tmp_path / "b" / "notes.txt").write_text("not an image extension: ignored")
    scan = scan_image_folder(tmp_path)
    assert scan.classes == ["a", "b"]
    assert [(os.path.basename(p), c) for p, c in scan.samples] == [("x.png", 0), ("y.jpg", 1)]
    assert sorted(os.path.basename(p) for p, _ in scan.skipped) == ["cut.png", "empty.jpg"]
    assert "skipping unreadable image files: 2 of 4 left out" in scan.note()


def test_scan_refuses_a_folder_without_readable_images(tmp_path):
    with pytest.raises(InputError, match="one sub-folder of images per class"):
        scan_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="none of its 1 image files is readable"):
        scan_image_folder(tmp_path)


def test_fuzzed_image_files_load_or_fail_with_an_input_error(tmp_path, recwarn):
    """Seeded random, truncated and bit-flipped files of every format esh reads: each one
    either loads as an 8-bit RGB image or is an InputError, never another exception."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    originals = []
    for fmt, img in (
        ("PNG", Image.fromarray(pixels)),
        ("JPEG", Image.fromarray(pixels)),
        ("BMP", Image.fromarray(pixels)),
        ("GIF", Image.fromarray(pixels).convert("P")),
        ("TIFF", Image.fromarray(pixels[..., 0].astype(np.float32) / 255)),
        ("PNG", Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)),
        ("WEBP", Image.fromarray(pixels)),
    ):
        buf = io.BytesIO()
        img.save(buf, fmt)
        originals.append(buf.getvalue())
    loaded = refused = 0
    for i in range(300):
        data = bytearray(originals[i % len(originals)])
        kind = i % 3
        if kind == 0:  # truncated
            data = data[: int(rng.integers(0, len(data)))]
        elif kind == 1:  # bit flips
            for pos in rng.integers(0, len(data), int(rng.integers(1, 8))):
                data[pos] ^= 1 << int(rng.integers(0, 8))
        else:  # random bytes behind a real header
            data = data[:16] + bytearray(rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes())
        path = tmp_path / f"f{i}.img"
        path.write_bytes(bytes(data))
        try:
            img = load_image(path)
        except InputError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            refused += 1
        else:
            assert img.mode == "RGB"
            loaded += 1
    assert refused > 100 and loaded + refused == 300
    assert not [w for w in recwarn if "PIL" in w.filename]  # PIL's notes on corrupt metadata stay quiet


def test_the_pixel_limit_from_the_environment_does_not_change_pil_for_the_process(tmp_path, monkeypatch):
    from PIL import Image

    from esh.data.images import load_image

    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    before = Image.MAX_IMAGE_PIXELS
    monkeypatch.setenv("ESH_MAX_IMAGE_PIXELS", "1000")
    assert load_image(tmp_path / "small.png").size == (8, 8)
    assert before == Image.MAX_IMAGE_PIXELS
