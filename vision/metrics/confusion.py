"""Detection confusion matrix: which class each ground-truth object was detected as, if at all.

Counts in a (K+1)x(K+1) matrix, rows the ground-truth class, columns the predicted class, the last
row and column "background": a missed object counts in its class's row, background column; a
detection matched to no object counts in the background row, its class's column.  Matching follows
Ultralytics' confusion matrix in being class-agnostic (a detection may match an object of another
class, which is what makes class confusions visible) with one detection per object; it differs in
taking detections greedily in score order (as COCO matching does), each the unmatched object it
overlaps most, where Ultralytics sorts candidate pairs by IoU, and in counting false positives also
in images where nothing matched.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np


def _xyxy(boxes_xywh: Sequence[Sequence[float]]) -> np.ndarray:
    b = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    import torch
    from torchvision.ops import box_iou

    return box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def detection_confusion_matrix(
    gt: dict[str, Any], dets: Sequence[dict[str, Any]], iou: float = 0.5, score_thresh: float = 0.25
) -> np.ndarray:
    """[K+1, K+1] int64 counts from a COCO ground-truth dict and a COCO results list.

    Classes are the ground truth's categories sorted by id (as ``Categories.from_coco`` orders them);
    crowd objects are left out; detections scoring below ``score_thresh`` are ignored; a detection
    matches an object at IoU >= ``iou``.
    """
    cat_ids = sorted(int(c["id"]) for c in gt.get("categories", []))
    index = {c: i for i, c in enumerate(cat_ids)}
    k = len(cat_ids)
    bg = k
    matrix = np.zeros((k + 1, k + 1), np.int64)
    gts: dict[Any, list[dict]] = defaultdict(list)
    for a in gt.get("annotations", []):
        if not a.get("iscrowd", 0):
            gts[a["image_id"]].append(a)
    found: dict[Any, list[dict]] = defaultdict(list)
    for d in dets:
        if float(d["score"]) >= score_thresh:
            found[d["image_id"]].append(d)
    for image_id in set(gts) | set(found):
        g, d = gts.get(image_id, []), found.get(image_id, [])
        g_cls = np.array([index[int(a["category_id"])] for a in g], np.int64)
        d = [d[i] for i in np.argsort([-float(x["score"]) for x in d], kind="stable")]
        d_cls = np.array([index[int(x["category_id"])] for x in d], np.int64)
        matched = np.zeros(len(g), bool)
        if g and d:
            ious = _iou(_xyxy([x["bbox"] for x in d]), _xyxy([a["bbox"] for a in g]))
        for j in range(len(d)):
            best = -1
            if g:
                cand = np.where(~matched & (ious[j] >= iou), ious[j], -1.0)
                best = int(cand.argmax()) if cand.max() >= 0 else -1
            if best < 0:
                matrix[bg, d_cls[j]] += 1
            else:
                matched[best] = True
                matrix[g_cls[best], d_cls[j]] += 1
        for i in np.flatnonzero(~matched):
            matrix[g_cls[i], bg] += 1
    return matrix


def classification_confusion_matrix(labels: Sequence[int], predicted: Sequence[int], num_classes: int) -> np.ndarray:
    """[K, K] counts, rows the true class, columns the predicted one (``cls_metrics``' own matrix)."""
    from vision.metrics.classification import confusion_matrix

    return confusion_matrix(np.asarray(labels), np.asarray(predicted), num_classes)
