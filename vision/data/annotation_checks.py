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


_BIG = 2**1023  # a JSON integer this large is no coordinate (and not convertible to a float)


def finite_number(x: Any) -> bool:
    """An int or float (not a bool) that is finite; huge JSON integers count as not finite."""
    t = type(x)  # the exact types json gives, tested first: this runs for every bbox number
    if t is float:
        return x - x == 0.0  # False for inf and nan
    if t is int:
        return -_BIG < x < _BIG
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


def compressed_runs(strings: list[str | bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decodes many pycocotools compressed RLE strings at once (its ``rleFrString``, vectorised).

    Returns ``(runs, owner, malformed)``: every run length in order, the index of the string each
    belongs to, and per string whether it is malformed (a character outside '0'..'o', a count of more
    than 35 bits, or an unfinished last count, which pycocotools would read past).  Each count is 5-bit
    groups ('0' + value), 0x20 marking "more", the last group's 0x10 the sign; from the fourth count on,
    each is stored as the difference to the count two before it.  One pass over all strings of a data
    set costs what a handful of per-string calls would.
    """
    n = len(strings)
    lengths = np.fromiter((len(x) for x in strings), np.int64, n)
    malformed = lengths == 0
    if all(type(x) is str for x in strings):  # one join and one encode; '?' (invalid) for wide characters
        joined = "".join(strings).encode("latin-1", errors="replace")
    else:
        joined = b"".join(x.encode("latin-1", errors="replace") if isinstance(x, str) else bytes(x) for x in strings)
    c = np.frombuffer(joined, np.uint8).astype(np.int64) - _RLE_FIRST
    if not len(c):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), malformed
    owner_of_char = np.repeat(np.arange(n), lengths)
    bad_char = (c < 0) | (c > 63)
    c[bad_char] = 0
    more = (c & 0x20) != 0
    last = np.cumsum(lengths)[lengths > 0] - 1
    malformed |= np.bincount(owner_of_char[bad_char], minlength=n) > 0
    malformed[lengths > 0] |= more[last]
    more[last] = False  # a count never runs into the next string
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    groups = ends - starts + 1
    malformed |= np.bincount(owner_of_char[ends[groups > 7]], minlength=n) > 0
    pos = np.minimum(np.arange(len(c)) - np.repeat(starts, groups), 6)
    x = np.add.reduceat((c & 0x1F) << (5 * pos), starts)
    negative = (c[ends] & 0x10) != 0
    x[negative] -= np.int64(1) << (5 * np.minimum(groups[negative], 7))
    owner = owner_of_char[ends]
    per_string = np.bincount(owner, minlength=n)
    first = np.cumsum(per_string) - per_string  # index of each string's first count
    index = np.arange(len(x)) - np.repeat(first, per_string)  # position of each count in its string
    # pycocotools: ``if (m > 2) x += cnts[m - 2]``: counts 1, 3, 5, ... and 2, 4, 6, ... are running sums
    runs = x.copy()
    for parity in (0, 1):
        chain = (index % 2 == parity) & (index > 0)
        total = np.cumsum(np.where(chain, x, 0))
        before = np.where(first > 0, total[np.maximum(first - 1, 0)], 0)  # the sums of earlier strings
        runs[chain] = total[chain] - before[owner[chain]]
    return runs, owner, malformed


def compressed_rle_problems(strings: list[str | bytes], sizes: list[tuple[int, int]]) -> list[str | None]:
    """For each compressed RLE string, what is wrong with it for its image's (height, width), or None."""
    runs, owner, malformed = compressed_runs(strings)
    n = len(strings)
    has_negative = np.bincount(owner[runs < 0], minlength=n) > 0
    covered = np.zeros(n, np.int64)
    np.add.at(covered, owner, runs)
    out: list[str | None] = []
    for k in range(n):
        if malformed[k]:
            out.append("segmentation RLE counts is not a valid compressed RLE string")
        elif has_negative[k]:
            out.append("segmentation RLE counts decode to a negative run length")
        elif covered[k] != sizes[k][0] * sizes[k][1]:
            h, w = sizes[k]
            out.append(f"segmentation RLE counts cover {int(covered[k])} pixels, not the image's {h}x{w} = {h * w}")
        else:
            out.append(None)
    return out


def rle_problem(seg: dict, height: int, width: int, check_compressed: bool = True) -> str | None:
    """A COCO RLE dict: ``size`` [height, width] of the image, ``counts`` summing to height * width.

    ``check_compressed=False`` leaves a compressed string's counts to ``compressed_rle_problems``."""
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
        if not check_compressed:
            return None  # the caller checks all compressed strings of its file at once
        return compressed_rle_problems([counts], [(height, width)])[0]
    else:
        return f"segmentation RLE counts must be a list of run lengths or a compressed string, got {describe(counts)}"
    if total != height * width:
        return f"segmentation RLE counts cover {total} pixels, not the image's {height}x{width} = {height * width}"
    return None


def segmentation_problem(seg: Any, height: int, width: int, check_compressed: bool = True) -> str | None:
    """What is wrong with a COCO segmentation (polygons or RLE) for an image of this size, or None."""
    if isinstance(seg, list):
        return polygons_problem(seg)
    if isinstance(seg, dict):
        return rle_problem(seg, height, width, check_compressed)
    if isinstance(seg, str):
        return "segmentation is a string (expected polygons or an RLE object)"
    return f"segmentation must be polygons or an RLE object, got {describe(seg)}"
