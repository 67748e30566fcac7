"""Image decoding: any file a user has -> upright 8-bit RGB, or an ``ImageReadError`` naming the file.

OpenCV does the decoding (fast, and ``IMREAD_COLOR`` already applies the EXIF orientation, drops
alpha, expands grayscale and scales 16-bit down to 8-bit).  libjpeg only warns on a truncated JPEG and
hands back a half-grey image, so JPEGs are also checked for their end-of-image marker: training on a
silently damaged image is worse than skipping it.

Pixels are counted from the header before anything is decoded: a PNG of a few megabytes can declare
gigapixels, and decoding it would allocate gigabytes or hit OpenCV's own pixel limit halfway through a
folder.  The limit is ``MAX_IMAGE_PIXELS`` (where Pillow stops, about 13377 x 13377, unless the environment
variable ``VISION_MAX_IMAGE_PIXELS`` says otherwise: a number, or ``none`` for no limit); an image over
it is an ``ImageReadError`` like any other unreadable file, so data sets skip it and folder prediction
moves on.  Every decoder failure (OpenCV, PIL, the file system) becomes an ``ImageReadError`` too.
"""

from __future__ import annotations

import io
import os
import re
import struct
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from vision.errors import ConfigError, ImageReadError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
# EXIF orientations 5..8 turn the stored image by 90 degrees: width and height swap.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112

_T = TypeVar("_T")

LIMIT_ENV = "VISION_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970  # what Pillow refuses outright by default (2 x its Image.MAX_IMAGE_PIXELS)
# What PIL raises or warns while reading a header or decoding (struct.error, SyntaxError and EOFError come
# out of damaged metadata, ValueError out of impossible field values).
_DECODER_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, Image.DecompressionBombError)


def _limit_from_env() -> int | str | None:
    raw = os.environ.get(LIMIT_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    if raw.lower() in ("none", "off", "0"):
        return None
    try:
        value = int(float(raw)) if re.fullmatch(r"[0-9.eE+]+", raw) else None
    except (ValueError, OverflowError):
        value = None
    return value if value is not None and value > 0 else raw  # a bad value is reported when first used


# The most pixels (width x height) an image may have before it is decoded; None: no limit.  Set it with
# ``set_max_image_pixels`` so that worker processes started afterwards read the same value.
MAX_IMAGE_PIXELS: int | str | None = _limit_from_env()


def set_max_image_pixels(limit: int | None) -> None:
    """Sets the pixel limit for this process and, through the environment, for processes it starts."""
    global MAX_IMAGE_PIXELS
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"the image pixel limit must be a positive integer or None, got {limit!r}")
    MAX_IMAGE_PIXELS = limit
    os.environ[LIMIT_ENV] = "none" if limit is None else str(limit)


def max_image_pixels() -> int | None:
    """The pixel limit in force (``MAX_IMAGE_PIXELS``), checked."""
    limit = MAX_IMAGE_PIXELS
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"{LIMIT_ENV}={limit!r}: expected a positive whole number of pixels, or none")
    # PIL refuses images over twice its own limit before vision can look at them: a larger limit asked
    # of vision raises PIL's to match (PIL's limit is only ever raised, never lowered).
    pil = Image.MAX_IMAGE_PIXELS
    if pil is not None and (limit is None or limit > 2 * pil):
        Image.MAX_IMAGE_PIXELS = None if limit is None else -(-limit // 2)
    return limit


def check_image_pixels(width: int, height: int, path: str | os.PathLike) -> None:
    """Raises ``ImageReadError`` when a ``width`` x ``height`` image is over the pixel limit."""
    limit = max_image_pixels()
    if limit is not None and width * height > limit:
        raise ImageReadError(
            path, f"image is {width}x{height} ({width * height} pixels), over the limit of {limit} pixels"
            f" ({LIMIT_ENV})"
        )


_PIL_LIMIT_LOCK = threading.Lock()


def _size_past_pil_limit(source: str | os.PathLike | IO[bytes]) -> tuple[int, int]:
    """The header size of an image PIL refused as a decompression bomb, for the message that names it.

    PIL has no header-only open without its check, so the check is lifted for this one (header-only)
    open; the lock keeps concurrent callers from restoring each other's values.
    """
    if hasattr(source, "seek"):
        source.seek(0)
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(source) as im:
                return im.size
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open_header(source: str | os.PathLike | IO[bytes], path: str | os.PathLike) -> Image.Image:
    """PIL's lazy ``Image.open`` (header only), its size checked against the pixel limit."""
    max_image_pixels()  # checks the setting and raises PIL's own limit to it where needed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
    except Image.DecompressionBombError:  # over twice PIL's limit, which is at least half of vision's
        width, height = _size_past_pil_limit(source)
        check_image_pixels(width, height, path)
        raise  # not reached: PIL's limit is never below half of vision's
    try:
        width, height = im.size
        check_image_pixels(width, height, path)
    except BaseException:
        im.close()
        raise
    return im


def _read_file(path: str | os.PathLike, read: Callable[[IO[bytes]], _T]) -> _T:
    """``read(f)`` on the open file, the file system's errors turned into one-line ``ImageReadError``s."""
    try:
        with open(path, "rb") as f:
            return read(f)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as e:
        raise ImageReadError(path, f"cannot read file ({e.strerror or e})") from None


def _read_bytes(path: str | os.PathLike) -> bytes:
    data = _read_file(path, lambda f: f.read())
    if not data:
        raise ImageReadError(path, "empty file (0 bytes)")
    return data


def _check_jpeg_end(data: bytes, path: str | os.PathLike, tail: bytes | None = None) -> None:
    """A JPEG (``data`` starts like one) must end with its end-of-image marker: in ``tail``, the file's
    last bytes, where only those were read, else in ``data`` itself."""
    end = data if tail is None else tail
    if data.startswith(_JPEG_START) and not end.rstrip(b"\x00\r\n ").endswith(_JPEG_END):
        raise ImageReadError(path, "truncated JPEG (no end-of-image marker)")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers (SOF0..SOF15 less DHT C4, JPG C8 and DAC CC) carry the image size
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _png_or_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) read straight from a PNG's IHDR or a JPEG's frame header, None for anything else.

    The two formats nearly every data set uses, parsed in microseconds; PIL's ``Image.open`` spends
    about half a millisecond on a JPEG's markers, a sixth of decoding a 640x480 photo.  Tests check the
    sizes against PIL's.
    """
    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if not data.startswith(_JPEG_START):
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _JPEG_SOF:
            if length < 7 or i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return (width, height) if height else None  # height 0: defined later (DNL), let PIL judge
        i += 2 + length
    return None


def _check_header_size(size: tuple[int, int], path: str | os.PathLike) -> None:
    """A (width, height) read from a header: some pixels, and no more than the limit."""
    if size[0] == 0 or size[1] == 0:
        raise ImageReadError(path, f"image has no pixels ({size[0]}x{size[1]})")
    check_image_pixels(size[0], size[1], path)


def _check_header(data: bytes, path: str | os.PathLike) -> None:
    """The pixel limit, from the header; files PIL cannot identify are left for OpenCV to judge."""
    size = _png_or_jpeg_size(data)
    if size is not None:
        _check_header_size(size, path)
        return
    try:
        _open_header(io.BytesIO(data), path).close()
    except UnidentifiedImageError:
        return
    except ImageReadError:
        raise
    except _DECODER_ERRORS as e:
        raise ImageReadError(path, f"cannot read image header ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _imdecode(data: bytes, flags: int, path: str | os.PathLike) -> np.ndarray:
    _check_jpeg_end(data, path)
    _check_header(data, path)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:
        raise ImageReadError(path, f"cannot decode image (OpenCV: {_one_line(e.err or e)})") from None
    if image is None:
        raise ImageReadError(path, "not a readable image (corrupt, truncated or unsupported format)")
    return image


def decode_image(data: bytes, path: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Decodes encoded image bytes to an upright HxWx3 uint8 RGB array (pixel limit checked first)."""
    image = _imdecode(data, cv2.IMREAD_COLOR, path)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)  # in place: one image-sized buffer, not two


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as an upright HxWx3 uint8 RGB array."""
    return decode_image(_read_bytes(path), path)


def read_image_unchanged(path: str | os.PathLike) -> np.ndarray:
    """The stored pixels as OpenCV's ``IMREAD_UNCHANGED`` gives them (class-index masks: no colour
    conversion, no rotation), with the same pixel limit and errors as ``read_image``."""
    return _imdecode(_read_bytes(path), cv2.IMREAD_UNCHANGED, path)


def read_image_header(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height), after checking the file is a complete image without decoding its pixels."""
    _check_jpeg_end(_read_bytes(path), path)
    return read_image_size(path)


_HEAD_BYTES = 1 << 16  # holds a PNG's IHDR and, but for huge embedded thumbnails, a JPEG's frame header
_TAIL_BYTES = 4096


def _head_and_tail(f: IO[bytes]) -> tuple[bytes, bytes]:
    """A file's first 64 KiB and last 4 KiB (the whole file where those are all JPEG padding)."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(_HEAD_BYTES)
    if size <= _HEAD_BYTES:
        return head, head
    f.seek(max(size - _TAIL_BYTES, 0))
    tail = f.read()
    if head.startswith(_JPEG_START) and not tail.rstrip(b"\x00\r\n "):
        f.seek(0)  # the last 4 KiB are all padding: look for the end marker in the whole file
        tail = f.read()
    return head, tail


def check_image_file(path: str | os.PathLike) -> None:
    """Raises the ``ImageReadError`` that reading ``path`` would raise for a missing, empty, truncated
    (JPEG, PNG), unidentifiable or oversized file, reading only its first 64 KiB and its last 4 KiB.

    What ``read_image_header`` finds, without reading the whole file: the check a data set runs on every
    image before training, where reading each file in full costs minutes on a large set.
    """
    head, tail = _read_file(path, _head_and_tail)
    if not head:
        raise ImageReadError(path, "empty file (0 bytes)")
    _check_jpeg_end(head, path, tail)
    if head.startswith(_PNG_SIGNATURE) and b"IEND" not in tail:
        raise ImageReadError(path, "truncated PNG (no IEND chunk)")
    size = _png_or_jpeg_size(head)
    if size is None:
        read_image_size(path)  # PIL reads the header of any other format (or a JPEG's beyond 64 KiB)
        return
    _check_header_size(size, path)


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the upright image, read from the header without decoding the pixels."""
    try:
        with _open_header(path, path) as im:
            width, height = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a readable image (unknown format)") from None
    except ImageReadError:
        raise
    except _DECODER_ERRORS as e:
        raise ImageReadError(path, f"cannot read image header ({_one_line(e)})") from None
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
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ImageReadError(source, f"cannot read the image list ({_one_line(e)})") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        return [str(Path(ln) if Path(ln).is_absolute() else base / ln) for ln in lines]
    if p.is_file():
        return [source]
    import glob

    matches = sorted(m for m in glob.glob(source, recursive=True) if Path(m).suffix.lower() in IMAGE_SUFFIXES)
    if not matches:
        raise ImageReadError(source, "no images found (not a folder, list file, image or matching glob)")
    return matches
