"""Checks of single annotation values, shared by the readers: numbers, ids, file names, COCO masks.

Each check returns a one-line description of what is wrong (or None), and the reader puts it behind
the file and the entry it came from.  The checks matter beyond tidy messages: pycocotools decodes RLE
counts without bounds checks (a run-length sum larger than the image writes past its buffer), a string
segmentation or a flat list of numbers ends in a ``TypeError`` deep inside a data loader worker, a
non-finite number turns into a full-image box after clipping, and a ``../`` file name reads outside
the image folder.
"""

from __future__ import annotations

import math
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

_RLE_FIRST, _RLE_LAST = 48, 48 + 63  # pycocotools' compressed counts: characters '0'..'o'


def describe(value: Any) -> str:
    """A short, one-line rendering of a bad value and its JSON type, for messages."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, float):
        return f"{value!r} (not a whole number)" if math.isfinite(value) else repr(value)
    if isinstance(value, int):
        text = str(value) if abs(value) < 10**20 else "an integer too large"
        return text
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def finite_number(x: Any) -> bool:
    """An int or float (not a bool) that is finite; huge JSON integers count as not finite."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def integer_id(x: Any) -> bool:
    """Ids are JSON integers: not strings, floats (7.0 included) or booleans."""
    return isinstance(x, int) and not isinstance(x, bool)


def flag(x: Any) -> bool:
    """COCO's ``iscrowd`` / VOC-style ``difficult`` values: 0, 1, true or false."""
    return isinstance(x, bool) or (isinstance(x, int) and x in (0, 1))


def file_name_problem(name: Any, allow_outside: bool = False) -> str | None:
    """What is wrong with an annotation file's image name, or None.

    A name is taken relative to the image folder, so an absolute path or a ``..`` component would read
    (and, when converting, name) a file outside it; ``allow_outside`` accepts both on purpose.
    """
    if not isinstance(name, str) or not name:
        return f"file_name must be a non-empty string, got {describe(name)}"
    if "\x00" in name:
        return "file_name contains a NUL character"
    if allow_outside:
        return None
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        return f"file_name {name!r} is an absolute path (images are looked up inside the image folder)"
    if ".." in PureWindowsPath(name).parts:  # Windows parsing splits on both '/' and '\\'
        return f"file_name {name!r} leads out of the image folder ('..')"
    return None


def _number_list_problem(values: list, what: str) -> str | None:
    if not all(type(v) is int or type(v) is float for v in values):  # JSON numbers only (bool excluded)
        bad = next(v for v in values if not (type(v) is int or type(v) is float))
        return f"{what} holds {describe(bad)}, not a number"
    try:
        total = float(sum(values))
    except OverflowError:
        total = math.inf
    if not math.isfinite(total):
        bad = next((v for v in values if not finite_number(v)), None)
        return f"{what} holds {describe(bad) if bad is not None else 'numbers too large'}, not a finite number"
    return None


def polygons_problem(seg: list) -> str | None:
    """A COCO polygon segmentation: a list of polygons, each at least 3 points of (x, y) numbers."""
    if seg and all(isinstance(v, (int, float)) for v in seg):
        return f"segmentation is a flat list of {len(seg)} numbers (expected a list of polygons [[x1, y1, x2, y2, ...]])"
    for k, poly in enumerate(seg, start=1):
        if not isinstance(poly, list):
            return f"segmentation polygon {k} is {describe(poly)}, not a list of numbers"
        if len(poly) % 2:
            return f"segmentation polygon {k} has an odd count of numbers ({len(poly)}; they are x, y pairs)"
        if len(poly) < 6:
            return f"segmentation polygon {k} has {len(poly)} numbers (a polygon needs 3 points: 6 numbers)"
        problem = _number_list_problem(poly, f"segmentation polygon {k}")
        if problem:
            return problem
    return None


def compressed_counts(s: str | bytes) -> np.ndarray | None:
    """The run lengths of a pycocotools compressed RLE string (its ``rleFrString``), or None if malformed.

    Each count is 5-bit groups ('0' + value), 0x20 marking "more", the last group's 0x10 the sign;
    from the fourth count on, each is stored as the difference to the count two before it.
    """
    data = np.frombuffer(s.encode("latin-1") if isinstance(s, str) else bytes(s), np.uint8)
    if not len(data) or data.min() < _RLE_FIRST or data.max() > _RLE_LAST:
        return None
    c = data.astype(np.int64) - _RLE_FIRST
    more = (c & 0x20) != 0
    if more[-1]:
        return None  # the last count is unfinished: pycocotools would read past the string
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    pos = np.arange(len(c)) - np.repeat(starts, ends - starts + 1)  # 5-bit group index within its count
    if pos.max() > 6:
        return None  # more than 35 bits: not a count of any image
    x = np.add.reduceat((c & 0x1F) << (5 * pos), starts)
    negative = (c[ends] & 0x10) != 0
    x = np.where(negative, x - (1 << (5 * (pos[ends] + 1))), x)
    counts = x.copy()
    # pycocotools: ``if (m > 2) x += cnts[m - 2]``, so counts 0, 1 and 2 are absolute.
    for first in (3, 4):
        if len(counts) > first:
            counts[first - 2::2] = np.cumsum(np.concatenate([[counts[first - 2]], x[first::2]]))
    return counts


def rle_problem(seg: dict, height: int, width: int) -> str | None:
    """A COCO RLE dict: ``size`` [height, width] of the image, ``counts`` summing to height * width."""
    for key in ("counts", "size"):
        if key not in seg:
            return f"segmentation RLE has no '{key}'"
    size = seg["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(integer_id(v) for v in size)):
        return f"segmentation RLE size must be [height, width], got {describe(size)}"
    if size != [height, width]:
        return f"segmentation RLE size {size} does not match the image ([height, width] = [{height}, {width}])"
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(integer_id(v) and v >= 0 for v in counts):
            bad = next(v for v in counts if not (integer_id(v) and v >= 0))
            return f"segmentation RLE counts hold {describe(bad)}, not a run length"
        total = sum(counts)
    elif isinstance(counts, (str, bytes)):
        runs = compressed_counts(counts)
        if runs is None:
            return "segmentation RLE counts is not a valid compressed RLE string"
        if (runs < 0).any():
            return "segmentation RLE counts decode to a negative run length"
        total = int(runs.sum())
    else:
        return f"segmentation RLE counts must be a list of run lengths or a compressed string, got {describe(counts)}"
    if total != height * width:
        return f"segmentation RLE counts cover {total} pixels, not the image's {height}x{width} = {height * width}"
    return None


def segmentation_problem(seg: Any, height: int, width: int) -> str | None:
    """What is wrong with a COCO segmentation (polygons or RLE) for an image of this size, or None."""
    if isinstance(seg, list):
        return polygons_problem(seg)
    if isinstance(seg, dict):
        return rle_problem(seg, height, width)
    if isinstance(seg, str):
        return "segmentation is a string (expected polygons or an RLE object)"
    return f"segmentation must be polygons or an RLE object, got {describe(seg)}"
