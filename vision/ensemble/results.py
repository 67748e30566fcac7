"""Fusion of whole COCO results files: several models' detections in, one fused list out.

A COCO results file is a JSON list of ``{"image_id", "category_id", "bbox": [x, y, w, h] (pixels),
"score"}`` with an optional ``"segmentation"`` (RLE or polygons).  Boxes are normalised by each
image's size (from a COCO ``images`` list), fused per image with any method of
``vision.ensemble.fuse_batch`` and written back in pixels; category ids are kept as they are in the
inputs.  All images are fused in a few vectorised batches rather than one call per image.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from vision.ensemble.fusion import METHODS, fuse_batch
from vision.errors import DataError, VisionError

ImageSizes = Mapping[int, tuple[int, int]]  # image id -> (width, height)
_BATCH_IMAGES = 256  # images read into one fuse_batch call (which chunks further)


def read_json(path: str | os.PathLike, what: str):
    """Parse a JSON file, turning a missing or malformed file into a one-line DataError."""
    if not os.path.isfile(path):
        raise DataError(path, f"{what} file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"not valid JSON ({e})") from None


def load_results(path: str | os.PathLike) -> list[dict]:
    """Read a COCO results file (a list of detections; a dict with ``annotations`` is accepted too)."""
    data = read_json(path, "detections")
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if not isinstance(data, list):
        raise DataError(path, "expected a COCO results list of detections")
    for i, d in enumerate(data):
        problem = _check_detection(d)
        if problem:
            raise DataError(path, f"detection {i}: {problem}")
    return data


def _check_detection(d) -> str | None:
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
    if method not in METHODS:
        raise VisionError(f"unknown fusion method '{method}', choose one of {', '.join(METHODS)}")
    n_models = len(results)
    if weights is not None and len(weights) != n_models:
        raise VisionError(f"{len(weights)} model weights given for {n_models} detection files")
    names = list(names) if names is not None else [f"detections {t}" for t in range(n_models)]
    per_image: dict[int, list[list[dict]]] = defaultdict(lambda: [[] for _ in range(n_models)])
    for t, dets in enumerate(results):
        for d in dets:
            if d["image_id"] not in image_sizes:
                raise DataError(names[t], f"image id {d['image_id']!r} is not in {images_name}")
            per_image[d["image_id"]][t].append(d)
    order = [i for i in image_sizes if i in per_image]
    w_model = np.ones(n_models) if weights is None else np.asarray(weights, dtype=np.float64)
    out: list[dict] = []
    for start in range(0, len(order), _BATCH_IMAGES):
        chunk = order[start : start + _BATCH_IMAGES]
        batch = [_to_arrays(per_image[i], image_sizes[i]) for i in chunk]
        with warnings.catch_warnings():  # boxes reaching past the image border are clipped to it
            warnings.filterwarnings("ignore", "box coordinates outside")
            fused = fuse_batch(batch, method, weights, iou_thr, skip_score, **options)
        for image_id, f in zip(chunk, fused):
            width, height = image_sizes[image_id]
            dets = per_image[image_id]
            masks = _fused_masks(dets, f.members, len(f.scores), w_model, (height, width)) if fuse_segmentation else {}
            for j in range(len(f.scores)):
                x1, y1, x2, y2 = (float(v) for v in f.boxes[j])
                det = {
                    "image_id": image_id,
                    "category_id": int(f.labels[j]),
                    "bbox": [x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height],
                    "score": float(f.scores[j]),
                }
                if j in masks:
                    det["segmentation"] = masks[j]
                out.append(det)
    return out


def _to_arrays(dets_by_model: list[list[dict]], size: tuple[int, int]):
    width, height = size
    scale = np.array([width, height, width, height], dtype=np.float64)
    boxes, scores, labels = [], [], []
    for dets in dets_by_model:
        if not dets:
            boxes.append(np.zeros((0, 4)))
            scores.append(np.zeros(0))
            labels.append(np.zeros(0, dtype=np.int64))
            continue
        b = np.array([d["bbox"] for d in dets], dtype=np.float64)
        b[:, 2:] += b[:, :2]
        boxes.append(b / scale)
        scores.append(np.array([d["score"] for d in dets], dtype=np.float64))
        labels.append(np.array([d["category_id"] for d in dets], dtype=np.int64))
    return boxes, scores, labels


def _decode(seg, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = dict(seg)
        if isinstance(rle.get("counts"), str):
            rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle)


def _fused_masks(dets, members, n_out: int, w_model: np.ndarray, shape: tuple[int, int]) -> dict[int, dict]:
    """Score-weighted mean of the member masks of each fused detection, as RLE (where any member has one)."""
    from pycocotools import mask as mask_utils

    acc: dict[int, np.ndarray] = {}
    total = np.zeros(n_out)
    for t, (model_dets, dest) in enumerate(zip(dets, members)):
        for d, j in zip(model_dets, dest):
            if j < 0 or "segmentation" not in d:
                continue
            coef = float(d["score"]) * w_model[t]
            m = _decode(d["segmentation"], *shape).astype(np.float64)
            acc[j] = acc[j] + coef * m if j in acc else coef * m
            total[j] += coef
    out = {}
    for j, a in acc.items():
        mean = a / total[j] if total[j] > 0 else a
        rle = mask_utils.encode(np.asfortranarray((mean >= 0.5).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        out[int(j)] = rle
    return out


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON, creating the parent folder."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
