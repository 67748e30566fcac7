"""COCO evaluation with pycocotools, and conversion of model outputs to COCO results.

pycocotools computes every number; this module only feeds it, checks that results refer to images the
ground truth has (pycocotools would stop on an assertion), and reads per-class AP out of its
precision array the way Detectron's reports do.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from vision.data.coco_results import prediction_to_results
from vision.data.records import DetectionSet
from vision.errors import VisionError

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# Where ``evaluate_coco`` hands its accumulated COCOeval objects while ``keep_coco_evals`` is open.
_KEPT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("kept_coco_evals", default=None)


@contextlib.contextmanager
def keep_coco_evals() -> Iterator[dict[str, Any]]:
    """``{iou_type: COCOeval}`` of every evaluation run inside the block (after ``accumulate``).

    Precision-recall plots need pycocotools' full precision array, which the metrics leave out; this
    hands it over without changing what any evaluator returns or computing anything twice.
    """
    kept: dict[str, Any] = {}
    token = _KEPT.set(kept)
    try:
        yield kept
    finally:
        _KEPT.reset(token)


def _coco_from_dict(gt: dict[str, Any]):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {k: v for k, v in gt.items()}
    coco.dataset.setdefault("annotations", [])
    coco.dataset.setdefault("categories", [])
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _result_problem(r: dict[str, Any]) -> str | None:
    """What makes a result unusable for scoring (a NaN box or score would be ranked and matched)."""
    if not _finite_number(r["score"]):
        return f"score {r['score']!r} is not a finite number"
    bbox = r.get("bbox")
    if bbox is not None:
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_finite_number(v) for v in bbox)):
            return f"bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}"
        if bbox[2] < 0 or bbox[3] < 0:
            return f"bbox {list(bbox)} has a negative width or height"
    elif "segmentation" not in r:
        return "needs a bbox (or a segmentation)"
    return None


def check_results(gt: dict[str, Any], results: Sequence[dict[str, Any]], source: str = "detections") -> list[dict]:
    """Results that name images by id (or by ``file_name``) as ids, after checking each one exists."""
    by_name = {img["file_name"]: img["id"] for img in gt.get("images", [])}
    ids = set(by_name.values())
    cat_ids = {c["id"] for c in gt.get("categories", [])}
    out, missing, bad_cats = [], set(), set()
    for k, r in enumerate(results):
        if not isinstance(r, dict):
            raise VisionError(f"{source}: entry {k} is not an object")
        if "image_id" not in r and "file_name" in r:
            r = {**r, "image_id": by_name.get(r["file_name"], r["file_name"])}
        if "image_id" not in r or "category_id" not in r or "score" not in r:
            raise VisionError(f"{source}: entry {k} needs image_id, category_id and score")
        problem = _result_problem(r)
        if problem:
            raise VisionError(f"{source}: entry {k} (image {r['image_id']}): {problem}")
        if r["image_id"] not in ids:
            missing.add(r["image_id"])
        if r["category_id"] not in cat_ids:
            bad_cats.add(r["category_id"])
        out.append(r)
    if missing:
        shown = ", ".join(str(m) for m in sorted(missing, key=str)[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise VisionError(f"{source}: image ids not in the ground truth: {shown}{more}")
    if bad_cats:
        raise VisionError(f"{source}: category ids not in the ground truth: {sorted(bad_cats)}")
    return out


def evaluate_coco(
    gt: dict[str, Any],
    results: Sequence[dict[str, Any]],
    iou_type: str = "bbox",
    *,
    max_dets: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Runs COCOeval; returns ``{iou_type: {AP, AP50, ...}, "per_class": {name: AP}, "summary": text}``.

    ``max_dets`` raises the last detections-per-image limit (COCO's 100), for images that hold more
    objects than that; the AR100-style keys then refer to that limit.
    """
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise VisionError(f"unknown iou type '{iou_type}' (expected bbox or segm)")
    coco_gt = _coco_from_dict(gt)
    results = list(results)
    if iou_type == "segm":
        missing = [k for k, r in enumerate(results) if "segmentation" not in r]
        if missing:
            raise VisionError(f"segm evaluation needs a 'segmentation' in every result (entry {missing[0]} has none)")
    stats = np.full(len(STAT_NAMES), -1.0)
    precision = None
    summary = ""
    if results:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            if max_dets is not None:
                ev.params.maxDets = [1, 10, max_dets]
            ev.evaluate()
            ev.accumulate()
        kept = _KEPT.get()
        if kept is not None:
            kept[iou_type] = ev
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            ev.summarize()
        summary = out.getvalue()
        stats = ev.stats
        precision = ev.eval["precision"]
        if max_dets is not None and 100 not in ev.params.maxDets:
            stats, summary = _ap_at_last_limit(stats, summary, precision, max_dets)
    else:
        stats = _no_detection_stats(coco_gt, iou_type)
        summary = "no detections: AP and AR are 0 wherever the ground truth has objects\n"
    if verbose and summary:
        print(summary, end="")
    per_class = {}
    cats = sorted(coco_gt.dataset["categories"], key=lambda c: c["id"])
    cat_ids = coco_gt.getCatIds()
    for cat in cats:
        ap = -1.0
        if precision is not None:
            k = cat_ids.index(cat["id"])
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            ap = float(p.mean()) if p.size else -1.0
        elif coco_gt.getAnnIds(catIds=[cat["id"]], iscrowd=False):
            ap = 0.0  # objects to find and nothing found
        per_class[str(cat.get("name", cat["id"]))] = ap
    return {iou_type: dict(zip(STAT_NAMES, (float(s) for s in stats))), "per_class": per_class, "summary": summary}


# COCOeval's area ranges, in the order of its 12 summary numbers' area column
_AREA_OF_STAT = ("all", "all", "all", "small", "medium", "large", "all", "all", "all", "small", "medium", "large")


def _no_detection_stats(coco_gt: Any, iou_type: str) -> np.ndarray:
    """The 12 summary numbers when there are no detections at all.

    pycocotools cannot load an empty results list, and would report -1 ("undefined") everywhere;
    with objects to find and none found, precision and recall are 0.  An area range holding no
    ground truth object stays -1, as COCOeval reports it when there are detections.
    """
    from pycocotools.cocoeval import Params

    ranges = dict(zip(Params(iouType=iou_type).areaRngLbl, Params(iouType=iou_type).areaRng))
    areas = [a.get("area", 0.0) for a in coco_gt.dataset.get("annotations", []) if not a.get("iscrowd", 0)]
    stats = np.full(len(STAT_NAMES), -1.0)
    for i, label in enumerate(_AREA_OF_STAT):
        lo, hi = ranges[label]
        if any(lo <= a <= hi for a in areas):
            stats[i] = 0.0
    return stats


def _ap_at_last_limit(stats: np.ndarray, summary: str, precision: np.ndarray, max_dets: int) -> tuple[np.ndarray, str]:
    """The first AP at ``max_dets`` detections per image.

    pycocotools' ``summarize`` takes its first AP at a fixed 100 detections, which is not among the
    limits once they are changed, and reports -1 for it; every other AP already uses the last limit.
    """
    p = precision[:, :, :, 0, -1]
    ap = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    stats = np.array(stats, dtype=float)
    stats[0] = ap
    lines = summary.splitlines(keepends=True)
    if lines:
        head, _, _ = lines[0].rpartition("=")
        lines[0] = head.replace("maxDets=100", f"maxDets={max_dets:>3d}") + f"= {ap:0.3f}\n"
    return stats, "".join(lines)


UNDEFINED_NOTE = "(-1.000: the ground truth has no objects in that area range, so COCOeval leaves it undefined)"


def explain_undefined(summary: str) -> str:
    """COCOeval's table followed, once, by what its -1 means, where one appears."""
    return summary + (UNDEFINED_NOTE + "\n" if "= -1.000" in summary else "")


def format_per_class(per_class: Mapping[str, float], title: str = "AP") -> str:
    """A two-column table of per-class AP (n/a for classes with no ground truth)."""
    width = max([len(n) for n in per_class] + [8])
    lines = [f"{'class':<{width}}  {title:>6}"]
    for name, ap in per_class.items():
        lines.append(f"{name:<{width}}  {ap * 100:6.2f}" if ap >= 0 else f"{name:<{width}}  {'n/a':>6}")
    return "\n".join(lines)


def evaluate_detections(
    det_set: DetectionSet,
    predictions: Mapping[int, Mapping[str, Any]],
    iou_types: Sequence[str] = ("bbox",),
    *,
    max_dets: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Evaluates per-image predictions (keyed by image_id) against a data set with pycocotools."""
    from vision.data.coco import to_coco_dict

    gt = to_coco_dict(det_set)
    results = [
        r for image_id, pred in predictions.items() for r in prediction_to_results(image_id, pred, det_set.categories)
    ]
    metrics: dict[str, Any] = {}
    for iou_type in iou_types:
        m = evaluate_coco(gt, results, iou_type, max_dets=max_dets, verbose=verbose)
        metrics[iou_type] = m[iou_type]
        metrics["per_class" if iou_type == "bbox" else f"per_class_{iou_type}"] = m["per_class"]
        metrics.setdefault("summary", {})[iou_type] = m["summary"]
    return metrics
