"""Image decoding: any file a user has -> upright 8-bit RGB, or an ``ImageReadError`` naming the file.

OpenCV does the decoding (fast, and ``IMREAD_COLOR`` already applies the EXIF orientation, drops
alpha, expands grayscale and scales 16-bit down to 8-bit).  libjpeg only warns on a truncated JPEG and
hands back a half-grey image, so JPEGs are also checked for their end-of-image marker: training on a
silently damaged image is worse than skipping it.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from vision.errors import ImageReadError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
# EXIF orientations 5..8 turn the stored image by 90 degrees: width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


def _read_bytes(path: str | os.PathLike) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise ImageReadError(path, "empty file (0 bytes)")
    return data


def _check_jpeg_end(data: bytes, path: str | os.PathLike) -> None:
    if data.startswith(_JPEG_START) and not data.rstrip(b"\x00\r\n ").endswith(_JPEG_END):
        raise ImageReadError(path, "truncated JPEG (no end-of-image marker)")


def decode_image(data: bytes, path: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Decodes encoded image bytes to an upright HxWx3 uint8 RGB array."""
    _check_jpeg_end(data, path)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageReadError(path, "not a readable image (corrupt, truncated or unsupported format)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as an upright HxWx3 uint8 RGB array."""
    return decode_image(_read_bytes(path), path)


def read_image_header(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height), after checking the file is a complete image without decoding its pixels."""
    _check_jpeg_end(_read_bytes(path), path)
    return read_image_size(path)


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the upright image, read from the header without decoding the pixels."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a readable image (unknown format)") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot read image header ({e})") from None
    if width <= 0 or height <= 0:
        raise ImageReadError(path, f"image has no pixels ({width}x{height})")
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return width, height


def list_images(source: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Image files under a folder (sorted), matched by a glob, or named one per line in a list file."""
    source = str(source)
    p = Path(source)
    if p.is_dir():
        pattern = "**/*" if recursive else "*"
        return sorted(str(f) for f in p.glob(pattern) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if p.is_file() and p.suffix.lower() in (".txt", ".lst"):
        base = p.parent
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        return [str(Path(ln) if Path(ln).is_absolute() else base / ln) for ln in lines]
    if p.is_file():
        return [source]
    import glob

    matches = sorted(m for m in glob.glob(source, recursive=True) if Path(m).suffix.lower() in IMAGE_SUFFIXES)
    if not matches:
        raise ImageReadError(source, "no images found (not a folder, list file, image or matching glob)")
    return matches
