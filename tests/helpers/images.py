"""Small folders of random images for the prediction tests, and crafted files that declare huge sizes."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def write_random_images(folder: Path, sizes: Sequence[tuple[int, int]], *, seed: int = 0,
                        pattern: str = "img{}.png", start: int = 0) -> list[Path]:
    """Writes one random RGB image per ``(height, width)``, named ``pattern.format(index)``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes, start=start):
        path = folder / pattern.format(i)
        cv2.imwrite(str(path), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        paths.append(path)
    return paths


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header(width: int, height: int, color_type: int = 0) -> bytes:
    """A PNG declaring width x height (8-bit gray or RGB) with one compressed row of zeros."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to declare width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 20, 200)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)
