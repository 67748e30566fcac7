"""COCO results as columns: read, checked, fused and written as whole arrays.

A results file of a few hundred thousand detections costs seconds when every detection is a dict that
Python code visits several times (checked, grouped, converted, rebuilt for the output).  Here the
parsed list is turned into four arrays in one pass per field; every check, the grouping by image, the
normalisation and the conversion back to pixels are array operations; dicts exist only transiently,
inside the JSON parser and the encoder.

Checks (``check_detections``), and what happens to an entry that fails them:

- rejected (``DataError`` naming the file and the detection's index), as signs of a file that does not
  belong to these images or is in another format: an unknown image id, a category id missing from the
  images file's categories (when it lists any), a score outside [0, 1], a box of negative width or
  height (x2 < x1 given as [x, y, w, h]);
- dropped and counted, as one model's numerical accident that should not sink the ensemble: a box or
  score that is NaN or infinite (Python's ``json`` writes them as ``NaN`` / ``Infinity``).  Dropped
  before fusion, a NaN cannot spread into the boxes it would have been fused with.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vision.ensemble.fusion import fuse_batch
from vision.errors import DataError


@dataclass
class Detections:
    """One results file (or one fused result) as columns."""

    image_id: np.ndarray  # (N,) int64
    category_id: np.ndarray  # (N,) int64
    bbox: np.ndarray  # (N, 4) float64, [x, y, width, height] in pixels
    score: np.ndarray  # (N,) float64
    segmentation: list | None = None  # per detection (None where it has none); None when none has one

    def __len__(self) -> int:
        return int(self.score.size)

    def take(self, idx: np.ndarray) -> Detections:
        seg = None if self.segmentation is None else [self.segmentation[i] for i in idx.tolist()]
        return Detections(self.image_id[idx], self.category_id[idx], self.bbox[idx], self.score[idx], seg)

    def to_dicts(self) -> list[dict]:
        """COCO results dicts (what ``json`` / ``msgspec`` serialise)."""
        out = [
            {"image_id": i, "category_id": c, "bbox": b, "score": s}
            for i, c, b, s in zip(
                self.image_id.tolist(), self.category_id.tolist(), self.bbox.tolist(), self.score.tolist()
            )
        ]
        if self.segmentation is not None:
            for d, seg in zip(out, self.segmentation):
                if seg is not None:
                    d["segmentation"] = seg
        return out


def empty_detections() -> Detections:
    e = np.zeros(0, dtype=np.int64)
    return Detections(e, e.copy(), np.zeros((0, 4)), np.zeros(0))


def _first_problem(data: Sequence, start: int = 0) -> tuple[int, str] | None:
    for i in range(start, len(data)):
        problem = check_detection(data[i])
        if problem:
            return i, problem
    return None


def _raise_first_problem(data: Sequence, path: str, fallback: str):
    found = _first_problem(data)
    if found:
        raise DataError(path, f"detection {found[0]}: {found[1]}")
    raise DataError(path, fallback)


def _id_column(values: list, data: Sequence, path: str, key: str) -> np.ndarray:
    try:
        a = np.array(values)
    except (ValueError, OverflowError, TypeError):
        a = None
    if a is not None and a.ndim == 1 and a.dtype.kind in "iu":
        return a.astype(np.int64, copy=False)
    if a is not None and a.ndim == 1 and a.dtype.kind == "f" and np.all(np.isfinite(a) & (a == np.round(a))):
        return a.astype(np.int64)
    for i, v in enumerate(values):
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            raise DataError(path, f"detection {i}: '{key}' must be an integer, not {v!r}")
    raise DataError(path, f"'{key}' values must be 64-bit integers")


def from_dicts(data: Sequence, path: str = "detections", with_segmentation: bool = True) -> Detections:
    """Columns of a parsed COCO results list; a malformed entry is a DataError with its index.

    ``with_segmentation=False`` promises that no entry has a ``segmentation`` (not looked for then)."""
    n = len(data)
    if n == 0:
        return empty_detections()
    try:
        image_id = [d["image_id"] for d in data]
        category_id = [d["category_id"] for d in data]
        bbox = [d["bbox"] for d in data]
        score = [d["score"] for d in data]
    except (KeyError, TypeError):
        _raise_first_problem(data, path, "not a list of COCO detections")
    try:
        b = np.array(bbox)
    except (ValueError, TypeError):  # ragged
        b = None
    if b is None or b.shape != (n, 4) or b.dtype.kind not in "iuf":
        _raise_first_problem(data, path, "'bbox' must be four numbers [x, y, w, h]")
    try:
        s = np.array(score)
    except (ValueError, TypeError):
        s = None
    if s is None or s.shape != (n,) or s.dtype.kind not in "iuf":
        _raise_first_problem(data, path, "'score' must be a number")
    seg = None
    if with_segmentation and any("segmentation" in d for d in data):
        seg = [d.get("segmentation") for d in data]
    return Detections(
        _id_column(image_id, data, path, "image_id"),
        _id_column(category_id, data, path, "category_id"),
        b.astype(np.float64, copy=False),
        s.astype(np.float64, copy=False),
        seg,
    )


def _lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each id in ``sorted_ids`` and whether it is there at all."""
    if sorted_ids.size == 0:
        return np.zeros(ids.size, dtype=np.int64), np.zeros(ids.size, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    return pos, sorted_ids[pos] == ids


def check_detections(
    d: Detections,
    path: str,
    image_ids: np.ndarray,
    category_ids: np.ndarray | None = None,
    images_name: str = "images",
) -> tuple[Detections, int]:
    """Reject or drop bad entries as the module docstring lists; returns (kept, number dropped).

    ``image_ids``: every image id of the images file; ``category_ids``: its category ids (None or empty:
    any category is accepted).
    """
    if len(d) == 0:
        return d, 0
    _, known = _lookup(np.sort(image_ids), d.image_id)
    if not known.all():
        i = int(np.argmin(known))
        raise DataError(path, f"detection {i}: image id {int(d.image_id[i])} is not in {images_name}")
    if category_ids is not None and len(category_ids):
        _, known = _lookup(np.sort(category_ids), d.category_id)
        if not known.all():
            i = int(np.argmin(known))
            raise DataError(
                path, f"detection {i}: category id {int(d.category_id[i])} is not among {images_name}'s categories"
            )
    finite = np.isfinite(d.bbox).all(axis=1) & np.isfinite(d.score)
    bad = finite & ((d.score < 0) | (d.score > 1))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(path, f"detection {i}: score {float(d.score[i])!r} is outside [0, 1]")
    bad = finite & ((d.bbox[:, 2] < 0) | (d.bbox[:, 3] < 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            path, f"detection {i}: bbox {d.bbox[i].tolist()} has a negative width or height"
            " (COCO boxes are [x, y, width, height])"
        )
    n_bad = int(finite.size - np.count_nonzero(finite))
    return (d if n_bad == 0 else d.take(np.flatnonzero(finite))), n_bad


@dataclass
class ImageTable:
    """The images file's ids (in file order) and sizes, as arrays."""

    ids: np.ndarray  # (M,) int64
    width: np.ndarray  # (M,) float64
    height: np.ndarray  # (M,) float64

    @classmethod
    def from_sizes(cls, sizes, path: str = "images") -> ImageTable:
        keys = list(sizes)
        if any(isinstance(k, bool) or not isinstance(k, int) for k in keys):
            raise DataError(path, "image ids must be integers")
        wh = np.array([sizes[k] for k in keys], dtype=np.float64).reshape(-1, 2)
        return cls(np.array(keys, dtype=np.int64), wh[:, 0], wh[:, 1])


def fuse_detections(
    models: Sequence[Detections],
    images: ImageTable,
    method: str = "wbf",
    weights: Sequence[float] | None = None,
    iou_thr: float | None = None,
    skip_score: float = 0.0,
    fuse_segmentation: bool = True,
    **options,
) -> tuple[Detections, int]:
    """Fuse several models' (checked) detections image by image; see ``results.fuse_results``.

    Returns the fused detections, images in ``images`` order and each image's in fusion output order,
    and the number of fused boxes dropped because they are not finite: WBF's fused box of a cluster
    whose scores are all 0 is 0/0, in ensemble-boxes too, and its score is 0.
    """
    n_models = len(models)
    order = np.argsort(images.ids, kind="stable")
    sorted_ids = images.ids[order]
    n_img = images.ids.size
    per_model = []  # (boxes normalised to [0, 1], scores, labels, bounds per image, rows in file order)
    present = np.zeros(n_img, dtype=bool)
    for m in models:
        pos, _ = _lookup(sorted_ids, m.image_id)
        img = order[pos]
        rows = np.argsort(img, kind="stable")
        img = img[rows]
        b = m.bbox[rows]
        b[:, 2:] += b[:, :2]
        w, h = images.width[img], images.height[img]
        b = b / np.stack([w, h, w, h], axis=1)
        counts = np.bincount(img, minlength=n_img)
        present |= counts > 0
        bounds = np.concatenate(([0], np.cumsum(counts)))
        per_model.append((b, m.score[rows], m.category_id[rows], bounds, rows))
    present_idx = np.flatnonzero(present)
    with_masks = fuse_segmentation and any(m.segmentation is not None for m in models)
    if method == "wbf" and not with_masks:
        w_model = np.ones(n_models) if weights is None else np.asarray(weights, dtype=np.float64)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "box coordinates outside")
            fused = _wbf_rows(per_model, present_idx, w_model, iou_thr, skip_score, **options)
        return _assemble(fused, present_idx, images, None)
    batch = []
    for i in present_idx.tolist():
        spans = [(bd[i], bd[i + 1]) for *_, bd, _ in per_model]
        batch.append((
            [b[lo:hi] for (b, *_), (lo, hi) in zip(per_model, spans)],
            [s[lo:hi] for (_, s, *_), (lo, hi) in zip(per_model, spans)],
            [c[lo:hi] for (_, _, c, *_), (lo, hi) in zip(per_model, spans)],
        ))
    with warnings.catch_warnings():  # boxes reaching past the image border are clipped to it
        warnings.filterwarnings("ignore", "box coordinates outside")
        fused = fuse_batch(batch, method, weights, iou_thr, skip_score, members=with_masks, **options)
    seg = None
    if with_masks:
        from vision.ensemble.masks import fused_masks

        w_model = np.ones(n_models) if weights is None else np.asarray(weights, dtype=np.float64)
        seg = []
        for i, f in zip(present_idx.tolist(), fused):
            members = []
            for (_, s, _, bd, rows), m in zip(per_model, models):
                lo, hi = bd[i], bd[i + 1]
                segs = [None] * (hi - lo) if m.segmentation is None else [m.segmentation[r] for r in rows[lo:hi]]
                members.append((s[lo:hi], segs))
            shape = (int(images.height[i]), int(images.width[i]))
            masks = fused_masks(members, f.members, len(f.scores), w_model, shape)
            seg += [masks.get(j) for j in range(len(f.scores))]
    return _assemble([(f.boxes, f.scores, f.labels) for f in fused], present_idx, images, seg)


def _wbf_rows(per_model, present_idx, w_model, iou_thr, skip_score, conf_type="avg", allows_overflow=False):
    """WBF of every image straight from the per-model columns: one vectorised prefilter over all rows
    (ordered by image, then model, then file order, as ensemble-boxes concatenates them), then ``_wbf.wbf``
    on chunks of whole images.  Equals ``fuse_batch`` (tested) without its per-image lists."""
    from vision.ensemble import _wbf
    from vision.ensemble.fusion import _CHUNK_BOXES

    if conf_type not in _wbf.CONF_TYPES:
        raise ValueError(f"unknown conf_type {conf_type!r}, must be one of {', '.join(_wbf.CONF_TYPES)}")
    iou_thr = 0.55 if iou_thr is None else iou_thr
    img = np.concatenate([np.repeat(np.arange(bd.size - 1), np.diff(bd)) for *_, bd, _ in per_model])
    model = np.concatenate([np.full(bd[-1], t, dtype=np.int64) for t, (*_, bd, _) in enumerate(per_model)])
    order = np.argsort(img, kind="stable")  # image, then model, then file order
    p = _wbf.prefilter_rows(
        np.concatenate([x[0] for x in per_model])[order], np.concatenate([x[1] for x in per_model])[order],
        np.concatenate([x[2] for x in per_model])[order], model[order], w_model, skip_score,
    )
    img = img[order][p.source]
    # Chunks of whole images of about _CHUNK_BOXES boxes each (see fusion.fuse_batch).
    starts = np.searchsorted(img, present_idx)
    ends = np.searchsorted(img, present_idx, side="right")
    out = []
    k = 0
    empty = (np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    while k < present_idx.size:
        stop = max(k + 1, int(np.searchsorted(ends, starts[k] + _CHUNK_BOXES, side="right")))
        stop = min(stop, present_idx.size)
        lo, hi = starts[k], ends[stop - 1]
        if lo == hi:
            out += [empty] * (stop - k)
            k = stop
            continue
        local = np.searchsorted(present_idx[k:stop], img[lo:hi])
        chunk = _wbf.Prefiltered(*(x[lo:hi] for x in p))
        with np.errstate(invalid="ignore", divide="ignore"):  # zero scores give 0/0 there too
            r = _wbf.wbf(chunk, local, stop - k, w_model, iou_thr, conf_type, allows_overflow, members=False)
        out += list(zip(r.boxes, r.scores, r.labels))
        k = stop
    return out


def _assemble(fused, present_idx, images: ImageTable, seg) -> tuple[Detections, int]:
    """Per-image (boxes, scores, labels) back to pixel columns; non-finite rows dropped and counted."""
    if not fused:
        return empty_detections(), 0
    n_out = np.array([len(f[1]) for f in fused])
    img = np.repeat(present_idx, n_out)
    boxes = np.concatenate([f[0] for f in fused]).reshape(-1, 4).astype(np.float64, copy=False)
    w, h = images.width[img], images.height[img]
    x1, y1, x2, y2 = boxes.T
    bbox = np.stack([x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h], axis=1)
    score = np.concatenate([f[1] for f in fused]).astype(np.float64, copy=False)
    labels = np.concatenate([f[2] for f in fused]).astype(np.int64)
    out = Detections(images.ids[img], labels, bbox, score, seg)
    finite = np.isfinite(bbox).all(axis=1) & np.isfinite(score)
    n_bad = int(finite.size - np.count_nonzero(finite))
    return (out if n_bad == 0 else out.take(np.flatnonzero(finite))), n_bad


def check_detection(d) -> str | None:
    """What is wrong with one results entry's fields and types, or None."""
    if not isinstance(d, dict):
        return "not an object"
    for key in ("image_id", "category_id", "bbox", "score"):
        if key not in d:
            return f"missing '{key}'"
    bbox = d["bbox"]
    if not (isinstance(bbox, list | tuple) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
        return "'bbox' must be four numbers [x, y, w, h]"
    if not isinstance(d["score"], int | float):
        return "'score' must be a number"
    return None
