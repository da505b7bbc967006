"""Opening image files: the one loader every esh command and data set uses.

:func:`load_image` returns an 8-bit PIL image in the mode asked (RGB by default). It scales
high-bit-depth pixels into 0..255 instead of clipping them (16-bit PNGs and TIFFs: ``v / 257``;
float images in [0, 1]: ``v * 255``; float images outside [0, 255]: stretched from their minimum
to their maximum), refuses decompression bombs, and opens only regular files (a FIFO or a device
would block or never end). Every failure is one :class:`~esh.errors.InputError` naming the file.

:func:`scan_image_folder` lists a class-folder tree once, up front, keeping the images that
decode and counting the ones that do not, so a data set never holds an unreadable sample.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from esh.errors import InputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderScan",
    "MAX_PIXELS_ENV",
    "array_to_uint8",
    "load_image",
    "scan_image_folder",
    "to_8bit",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
MAX_PIXELS_ENV = "ESH_MAX_IMAGE_PIXELS"


def _pixel_limit() -> int | None:
    """The largest image (in pixels) esh opens: ``ESH_MAX_IMAGE_PIXELS`` (0: no limit), else
    ``PIL.Image.MAX_IMAGE_PIXELS`` (None: no limit)."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None:
        return Image.MAX_IMAGE_PIXELS
    try:
        limit = int(value)
    except ValueError:
        raise InputError(f"{MAX_PIXELS_ENV} must be a whole number of pixels (0: no limit); got {value!r}") from None
    if limit < 0:
        raise InputError(f"{MAX_PIXELS_ENV} must be a whole number of pixels (0: no limit); got {value!r}")
    return limit or None


def _too_large(path: str | os.PathLike, pixels: str, limit: int | None) -> InputError:
    return InputError(
        f"image {path} has {pixels} pixels, more than the limit of {limit:,} (a guard against decompression "
        f"bombs); to open it, set {MAX_PIXELS_ENV}=<pixels> (0: no limit) or PIL.Image.MAX_IMAGE_PIXELS"
    )


def array_to_uint8(arr: np.ndarray, what: str = "image") -> np.ndarray:
    """uint8 pixels from an integer or float array, scaled rather than clipped.

    uint8 and integers within 0..255 are kept; other integers within 0..65535 are 16-bit
    (``v / 257``); floats within [0, 1] are ``v * 255``, floats within [0, 255] are kept (rounded);
    anything else (negative values, wider integers, larger floats) is stretched from its minimum
    to its maximum. Booleans are 0 / 255. NaN and inf are refused."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind not in "iuf":
        raise InputError(f"{what}: expected integer or float pixels; got dtype {arr.dtype}")
    if arr.size == 0:
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{what}: pixels contain NaN or inf")
    lo, hi = float(arr.min()), float(arr.max())
    if arr.dtype.kind == "f":
        if lo >= 0 and hi <= 1:
            return np.rint(arr.astype(np.float64) * 255).astype(np.uint8)
        if lo >= 0 and hi <= 255:
            return np.rint(arr).astype(np.uint8)
    elif lo >= 0 and hi <= 255:
        return arr.astype(np.uint8)
    elif lo >= 0 and hi <= 65535:
        return np.rint(arr.astype(np.float64) / 257).astype(np.uint8)
    scaled = (arr.astype(np.float64) - lo) / (hi - lo if hi > lo else 1.0)
    return np.rint(scaled * 255).astype(np.uint8)


def to_8bit(img: Image.Image, mode: str = "RGB") -> Image.Image:
    """``img`` in ``mode`` with 8 bits per channel; 16-bit, 32-bit integer and float images are
    scaled (see :func:`array_to_uint8`) where PIL's ``convert`` would clip them."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = Image.fromarray(array_to_uint8(np.asarray(img), "image"), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # the palette's transparency survives as alpha
    return img if img.mode == mode else img.convert(mode)


def _check_regular(path: Path) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"image {path} does not exist") from None
    except OSError as e:
        raise InputError(f"cannot read image {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"image {path} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"image {path} is not a regular file (a FIFO, socket or device); give an image file")
    if st.st_size == 0:
        raise InputError(f"cannot read image {path}: the file is empty")


def load_image(path: str | os.PathLike, mode: str = "RGB", *, draft: bool = False) -> Image.Image:
    """The image file at ``path`` as an 8-bit PIL image in ``mode``, fully decoded.

    ``draft=True`` lets JPEGs decode at a reduced size (the whole file is still read and
    checked): for a fast readability check, not for the pixels."""
    path = Path(path)
    _check_regular(path)
    limit = _pixel_limit()
    pil_limit = Image.MAX_IMAGE_PIXELS
    if os.environ.get(MAX_PIXELS_ENV) is not None:
        Image.MAX_IMAGE_PIXELS = limit  # PIL's own check (at twice the limit) must agree, for this call
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below instead
            warnings.filterwarnings("ignore", category=UserWarning, module="PIL")  # corrupt metadata: loads or fails
            with Image.open(path) as img:
                w, h = img.size
                if limit is not None and w * h > limit:
                    raise _too_large(path, f"{w:,} x {h:,} = {w * h:,}", limit)
                if draft and img.format == "JPEG":
                    img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                img.load()
                return to_8bit(img, mode)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(path, f"{int(found[1]):,}" if found else "too many", limit) from None
    except PermissionError:
        raise InputError(f"cannot read image {path}: permission denied") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"cannot read image {path}: not an image file PIL can identify") from None
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise many types on corrupt data
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"cannot read image {path}: truncated or corrupt ({reason})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


@dataclass
class ImageFolderScan:
    """The readable images of a class-folder tree: ``samples`` as (path, class index),
    ``classes`` (sorted folder names) and the ``skipped`` unreadable files with their reasons."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def note(self) -> str:
        """One line on what was skipped ("" when nothing was)."""
        if not self.skipped:
            return ""
        total, reason = len(self.samples) + len(self.skipped), self.skipped[0][1]
        return f"{self.root}: skipping unreadable image files: {len(self.skipped)} of {total} left out ({reason})"


def _readable(path: str) -> str | None:
    """None when the image decodes, else the reason it does not."""
    try:
        load_image(path, draft=True)
    except InputError as e:
        return str(e)
    return None


def scan_image_folder(root: str | os.PathLike, workers: int | None = None) -> ImageFolderScan:
    """Every image file under ``root/<class>/`` (any depth, by extension), decoded once to
    keep only the readable ones; classes are the sorted sub-folder names, as torchvision's
    ``ImageFolder`` has them. A folder with no class folders or no readable image is an
    :class:`InputError`; unreadable files are in ``skipped`` (see :meth:`ImageFolderScan.note`)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise InputError(f"{root} is not an ImageFolder directory: expected one sub-folder of images per class")
    candidates: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            candidates += [
                (os.path.join(folder, f), index)
                for f in sorted(files)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
            ]
    if not candidates:
        raise InputError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders {classes[:5]}")
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        reasons = list(pool.map(_readable, (p for p, _ in candidates)))
    samples = [s for s, r in zip(candidates, reasons) if r is None]
    skipped = [(p, r) for (p, _), r in zip(candidates, reasons) if r is not None]
    if not samples:
        raise InputError(f"{root}: none of its {len(candidates)} image files is readable (first: {skipped[0][1]})")
    return ImageFolderScan(root, classes, samples, skipped)
