"""Fusion of whole COCO results files: several models' detections in, one fused list out.

A COCO results file is a JSON list of ``{"image_id", "category_id", "bbox": [x, y, w, h] (pixels),
"score"}`` with an optional ``"segmentation"`` (RLE or polygons).  Boxes are normalised by each
image's size (from a COCO ``images`` list), fused per image with any method of
``vision.ensemble.fuse_batch`` and written back in pixels; category ids are kept as they are in the
inputs.  All images are fused in a few vectorised batches rather than one call per image.

This module reads and writes the JSON (a compiled reader for plain results files, msgspec for the
rest and for writing; atomic writes) and keeps the dict-based API
(``load_results``, ``fuse_results``); the work itself is done on columns by ``vision.ensemble.detections``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain
from operator import attrgetter

import msgspec
import numpy as np

from vision.atomic import atomic_write
from vision.ensemble.fusion import METHODS
from vision.errors import DataError, VisionError

try:
    from vision.ensemble._columns import read_columns
except ImportError:  # built without a C compiler: msgspec reads every file
    read_columns = None

ImageSizes = Mapping[int, tuple[int, int]]  # image id -> (width, height)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a big JSON document is built or dropped.

    Parsed JSON has no reference cycles, yet each of its hundreds of thousands of dicts counts towards
    the collector's thresholds, and every full collection walks all of them: parsing a 30 MB results file
    costs twice as long with the collector running.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_json(path: str | os.PathLike, what: str):
    """Parse a JSON file, turning a missing or malformed file into a one-line DataError.

    msgspec parses strict JSON; a file it refuses is read again by Python's ``json``, which also accepts
    the ``NaN`` and ``Infinity`` that Python's own ``json.dump`` writes (and words its errors better).
    """
    return parse_json(read_bytes(path, what), path)


def _require_file(path: str | os.PathLike, what: str) -> None:
    if not os.path.isfile(path):
        raise DataError(path, f"{what} file not found")


def read_bytes(path: str | os.PathLike, what: str) -> bytes:
    _require_file(path, what)
    with open(path, "rb") as f:
        return f.read()


def parse_json(raw: bytes, path: str | os.PathLike):
    """``read_json`` on bytes already read."""
    with gc_paused():
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError:
            pass
        try:
            return json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise DataError(path, f"not valid JSON ({e})") from None


def _results_list(data, path) -> list:
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if not isinstance(data, list):
        raise DataError(path, "expected a COCO results list of detections")
    return data


def load_results(path: str | os.PathLike) -> list[dict]:
    """Read a COCO results file (a list of detections; a dict with ``annotations`` is accepted too)."""
    from vision.ensemble.detections import from_dicts

    data = _results_list(read_json(path, "detections"), path)
    with gc_paused():
        from_dicts(data, str(path))  # checks every entry's fields and types
    return data


def read_detections(path: str | os.PathLike):
    """A COCO results file as ``Detections`` columns (no dict outlives the parse)."""
    from vision.ensemble.detections import from_dicts

    _require_file(path, "detections")
    with open(path, "rb") as f, _mapped(f) as raw:
        dets = _typed_columns(raw)
        if dets is None:
            raw = bytes(raw)
    if dets is not None:
        return dets
    # anything unusual (masks, a malformed entry, an id beyond 64 bits): the generic path finds and words it
    data = _results_list(parse_json(raw, path), path)
    with_segmentation = raw.find(b'"segmentation"') >= 0  # a key that occurs nowhere in the text is in no entry
    del raw
    with gc_paused():
        dets = from_dicts(data, str(path), with_segmentation)
        del data
    return dets


def _typed_columns(raw: mmap.mmap | bytes):
    """Detections without masks as columns; None for anything else.

    The compiled reader (``_columns.c``) writes the numbers straight into the columns; what it leaves
    (and every file where it was not built) is decoded by msgspec into ``_Entry`` structs (no dict per
    entry; types and the box's length checked by msgspec) and gathered into columns from them.
    """
    from vision.ensemble.detections import Detections

    if read_columns is not None:
        columns = read_columns(raw)
        if columns is not None:
            n, image_id, category_id, bbox, score = columns
            return Detections(np.frombuffer(image_id, np.int64), np.frombuffer(category_id, np.int64),
                              np.frombuffer(bbox, np.float64).reshape(n, 4), np.frombuffer(score, np.float64))
    with gc_paused():
        try:
            entries = _DECODER.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        n = len(entries)
        if any(map(_SEGMENTATION, entries)):
            return None
        try:
            return Detections(
                np.fromiter(map(_IMAGE_ID, entries), np.int64, n),
                np.fromiter(map(_CATEGORY_ID, entries), np.int64, n),
                np.fromiter(chain.from_iterable(map(_BBOX, entries)), np.float64, 4 * n).reshape(n, 4),
                np.fromiter(map(_SCORE, entries), np.float64, n),
            )
        except OverflowError:  # an id beyond 64 bits
            return None


@contextlib.contextmanager
def _mapped(f) -> Iterator[mmap.mmap | bytes]:
    """The file's bytes, memory-mapped: the JSON parser reads the page cache in place instead of a
    copy (a tenth of a results file's decoding time, and as many fresh pages as the file has).  An empty
    file cannot be mapped and is read."""
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        yield f.read()
        return
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield mapped
    finally:
        mapped.close()


class _Entry(msgspec.Struct, gc=False):
    """One COCO results entry, as msgspec decodes it (unknown keys are skipped).  A mask is kept as its
    undecoded text: an entry that has one (even ``null``) sends the file down the generic path."""

    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    score: float
    segmentation: msgspec.Raw = msgspec.Raw()


_DECODER = msgspec.json.Decoder(list[_Entry])
_IMAGE_ID, _CATEGORY_ID, _BBOX, _SCORE, _SEGMENTATION = map(
    attrgetter, ("image_id", "category_id", "bbox", "score", "segmentation"))


def load_images(path: str | os.PathLike) -> tuple[dict[int, tuple[int, int]], list[dict]]:
    """Image sizes and categories from any COCO JSON with an ``images`` list."""
    data = read_json(path, "images")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(path, "expected a COCO JSON object with an 'images' list")
    sizes = {}
    for i, im in enumerate(data["images"]):
        try:
            w, h = int(im["width"]), int(im["height"])
            sizes[im["id"]] = (w, h)
        except (KeyError, TypeError, ValueError):
            raise DataError(path, f"image {i}: needs 'id', 'width' and 'height'") from None
        if w <= 0 or h <= 0:
            raise DataError(path, f"image {im['id']}: size {w}x{h} is not positive")
    categories = data.get("categories") or []
    return sizes, categories


def fuse_results(
    results: Sequence[Sequence[dict]],
    image_sizes: ImageSizes,
    method: str = "wbf",
    weights: Sequence[float] | None = None,
    iou_thr: float | None = None,
    skip_score: float = 0.0,
    names: Sequence[str] | None = None,
    images_name: str = "images",
    fuse_segmentation: bool = True,
    **options,
) -> list[dict]:
    """Fuse several models' COCO detections image by image.

    ``results[t]`` is model ``t``'s detection list; ``weights`` one weight per model; ``iou_thr``
    defaults to the method's ensemble-boxes default; ``skip_score`` drops detections below it first.
    ``options`` go to ``fuse_batch`` (``conf_type``, ``soft_method``, ``decayed_scores``...).  As in
    ensemble-boxes, NMS and soft-NMS multiply scores by ``weight / sum(weights)`` when weights are
    given, and WBF scores are means over models.  When members carry
    ``segmentation`` the fused detection gets the score-weighted mean of their masks, thresholded at
    0.5, as RLE.  ``names`` (file names) and ``images_name`` only make error messages precise.
    """
    from vision.ensemble.detections import ImageTable, check_detections, from_dicts, fuse_detections

    if method not in METHODS:
        raise VisionError(f"unknown fusion method '{method}', choose one of {', '.join(METHODS)}")
    n_models = len(results)
    if weights is not None and len(weights) != n_models:
        raise VisionError(f"{len(weights)} model weights given for {n_models} detection files")
    names = list(names) if names is not None else [f"detections {t}" for t in range(n_models)]
    table = ImageTable.from_sizes(image_sizes, images_name)
    with gc_paused():
        models = [check_detections(from_dicts(r, n), n, table.ids, None, images_name)[0]
                  for r, n in zip(results, names)]
        fused, _ = fuse_detections(models, table, method, weights, iou_thr, skip_score, fuse_segmentation,
                                   **options)
        return fused.to_dicts()


def write_json(path: str | os.PathLike, data) -> None:
    """Write strict JSON atomically (a failure leaves any old file as it was), creating the parent folder.

    msgspec writes a NaN or infinite float as ``null``; callers that may hold such values check them first.
    """
    payload = msgspec.json.encode(data)
    with atomic_write(path, "wb") as f:
        f.write(payload)


def write_detections(path: str | os.PathLike, dets) -> None:
    """Write ``Detections`` as a COCO results file (atomically); they must be finite (strict JSON).

    Without masks each row becomes a ``_Row`` struct, which msgspec encodes in C (its floats as the
    shortest text that reads back to the same bits): half the time of printing each column and
    interleaving the pieces, and a quarter of building dicts.
    """
    finite = np.isfinite(dets.bbox).all() and np.isfinite(dets.score).all()
    if not finite:
        raise ValueError("detections to write must be finite")
    if dets.segmentation is not None:
        with gc_paused():
            write_json(path, dets.to_dicts())
        return
    with gc_paused():
        rows = list(map(_Row, dets.image_id.tolist(), dets.category_id.tolist(), dets.bbox.tolist(),
                        dets.score.tolist()))
        payload = msgspec.json.encode(rows)
        del rows
    with atomic_write(path, "wb") as f:
        f.write(payload)


class _Row(msgspec.Struct, gc=False):
    """One COCO results entry as written, keys in this order."""

    image_id: int
    category_id: int
    bbox: list[float]
    score: float
