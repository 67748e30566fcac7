"""NMS, soft-NMS and score-sum NMS, vectorised across classes.

Each algorithm is sequential within a class (a box's fate depends on the boxes kept before it) but
independent across classes, so every class advances in lock-step: step ``k`` handles the k-th box of
all classes with array operations.  Inputs are prepared and ordered exactly as ensemble-boxes'
``nms_method`` does (clip to [0, 1], reorder corners, drop zero-area boxes, classes in sorted order,
Numba's quicksort order among tied scores), and IoUs use its expression order, so kept boxes match it
one for one.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from vision.ensemble._sort import grouped_descending_order, numba_quicksort_argsort


class Prepared(NamedTuple):
    """Boxes concatenated over models after ensemble-boxes' ``prepare_boxes``."""

    boxes: np.ndarray  # (N, 4), input dtype
    scores: np.ndarray  # (N,), weighted
    labels: np.ndarray  # (N,)
    source: np.ndarray  # (N,) index into the concatenation of all inputs
    image: np.ndarray | None = None  # (N,) image of each box when several images are fused at once


def _as_2d(b) -> np.ndarray:
    a = np.asarray(b)
    return a.reshape(-1, 4) if a.size == 0 else a


def prepare(boxes_list, scores_list, labels_list, weights, skip_box_thr: float | None = None) -> Prepared:
    """Weight scores, concatenate models, clip and reorder corners, drop zero-area boxes.

    ``skip_box_thr`` (not an ensemble-boxes NMS argument) also drops boxes whose unweighted score is
    below it; ``source`` still indexes the caller's boxes.
    """
    if len(scores_list) != len(boxes_list) or len(labels_list) != len(boxes_list):
        raise ValueError("boxes_list, scores_list and labels_list must have one entry per model")
    scores_list = list(scores_list)
    raw = None
    if skip_box_thr is not None and boxes_list:
        raw = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1) for x in scores_list])
    if weights is not None:
        if len(boxes_list) != len(weights):
            warnings.warn(
                f"incorrect number of weights: {len(weights)}, must be {len(boxes_list)}; ignored", stacklevel=3
            )
        else:
            w = np.array(weights)
            for i in range(len(w)):
                scores_list[i] = (np.array(scores_list[i]) * w[i]) / w.sum()
    for t in range(len(boxes_list)):
        if not (len(boxes_list[t]) == len(scores_list[t]) == len(labels_list[t])):
            raise ValueError(f"model {t}: boxes, scores and labels differ in length")
    if len(boxes_list) == 0:
        return Prepared(np.zeros((0, 4)), np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64))
    boxes = np.concatenate([_as_2d(b) for b in boxes_list])
    scores = np.concatenate([np.asarray(s).reshape(-1) for s in scores_list])
    labels = np.concatenate([np.asarray(lab).reshape(-1) for lab in labels_list])
    b = boxes.copy()
    if (b < 0).any() or (b > 1).any():
        warnings.warn("box coordinates outside [0, 1] were clipped", stacklevel=4)
    b[b < 0] = 0
    b[b > 1] = 1
    fixed = b.copy()
    fixed[:, 0] = np.min(b[:, [0, 2]], axis=1)
    fixed[:, 2] = np.max(b[:, [0, 2]], axis=1)
    fixed[:, 1] = np.min(b[:, [1, 3]], axis=1)
    fixed[:, 3] = np.max(b[:, [1, 3]], axis=1)
    area = (fixed[:, 2] - fixed[:, 0]) * (fixed[:, 3] - fixed[:, 1])
    keep = area > 0
    if raw is not None:
        keep &= raw >= skip_box_thr
    keep = np.flatnonzero(keep)
    return Prepared(fixed[keep], scores[keep], labels[keep], keep)


class Layout(NamedTuple):
    """Boxes of each class laid out in padded rows, largest class first."""

    group_image: np.ndarray  # image of each group; groups are sorted by (image, label)
    row_gid: np.ndarray  # group index of each row
    sizes: np.ndarray  # boxes per row
    index: np.ndarray  # (rows, nmax) prepared-box index, -1 where padded
    active: np.ndarray  # number of rows with more than k boxes


def _sorted_groups(labels: np.ndarray, image: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Group index of each box, groups sorted by (image, label), and each group's image.

    Integer-valued labels over a modest range use a lookup table; anything else goes through
    ``np.unique`` (labels are compared as values, as ``np.unique`` in ensemble-boxes does).
    """
    n_images = 1 if image is None else int(image.max()) + 1
    integral = labels.dtype.kind in "iu" or (
        labels.dtype.kind == "f" and bool(np.all(np.isfinite(labels))) and bool(np.all(labels == np.floor(labels)))
    )
    if integral:
        li = labels.astype(np.int64)
        lo = int(li.min())
        span = int(li.max()) - lo + 1
        if span * n_images <= 4_000_000:
            key = li - lo if image is None else image * span + (li - lo)
            present = np.zeros(span * n_images, dtype=bool)
            present[key] = True
            keys = np.flatnonzero(present)
            gid_of_key = np.empty(span * n_images, dtype=np.int64)
            gid_of_key[keys] = np.arange(keys.size)
            return gid_of_key[key], keys // span
    _, label_idx = np.unique(labels, return_inverse=True)
    label_idx = label_idx.reshape(-1)
    key = label_idx if image is None else image * (int(label_idx.max()) + 1) + label_idx
    uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
    group_image = np.zeros(uniq.size, dtype=np.int64) if image is None else image[first]
    return inv.reshape(-1), group_image


def layout(p: Prepared, order_key: np.ndarray | None, argsort) -> Layout:
    """Group by (image, label), sorted; within a group, input order (``order_key`` None) or descending
    key order."""
    gid, group_image = _sorted_groups(p.labels, p.image)
    n_groups = group_image.size
    if order_key is None:
        order = np.argsort(gid, kind="stable")
    else:
        order = grouped_descending_order(gid, order_key, argsort)
    sizes = np.bincount(gid, minlength=n_groups)
    row_gid = np.argsort(-sizes, kind="stable")
    row_of_gid = np.empty(n_groups, dtype=np.int64)
    row_of_gid[row_gid] = np.arange(n_groups)
    nmax = int(sizes.max()) if sizes.size else 0
    sg = gid[order]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    pos = np.arange(order.size) - starts[sg]
    index = np.full((n_groups, nmax), -1, dtype=np.int64)
    index[row_of_gid[sg], pos] = order
    row_sizes = sizes[row_gid]
    active = np.searchsorted(-row_sizes, -np.arange(nmax), side="left")  # rows with size > k
    return Layout(group_image, row_gid, row_sizes, index, active)


def greedy_nms(p: Prepared, iou_thr: float, stable: bool = False) -> tuple[Layout, np.ndarray]:
    """Hard NMS per class.  Returns the layout and, per laid-out slot, the slot that absorbed it.

    ``owner[r, k] == k`` marks a kept box; otherwise it is the position of the kept box that
    suppressed it (-1 for padding).  ``stable`` orders ties by input position instead of ensemble-boxes'
    Numba quicksort (for score-sum NMS, which has no reference to match).
    """
    if stable:
        # Reversed by the caller, so this yields descending scores with ties in input order.
        argsort = lambda v: np.argsort(-v, kind="stable")[::-1]  # noqa: E731
    else:
        argsort = numba_quicksort_argsort
    lay = layout(p, p.scores, argsort)
    valid = lay.index >= 0
    n_rows, nmax = lay.index.shape
    # Channel-first (x1, y1, -x2, -y2, area): one np.maximum gives the intersection's low corner and
    # its negated high corner; negation is exact, so the IoU is bit-for-bit the reference's.
    B = np.zeros((5, n_rows, nmax))
    b = p.boxes.astype(np.float64)[lay.index[valid]]
    B[0, valid], B[1, valid] = b[:, 0], b[:, 1]
    B[2, valid], B[3, valid] = -b[:, 2], -b[:, 3]
    B[4, valid] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    alive = valid.copy()
    owner = np.full(valid.shape, -1, dtype=np.int64)
    for k in range(nmax - 1):
        a = int(lay.active[k + 1])  # rows with a box after position k
        if a == 0:
            break
        m = np.maximum(B[:4, :a, k, None], B[:4, :a, k + 1 :])
        d = m[:2] + m[2:4]  # minus the overlap width and height
        np.minimum(d, 0.0, out=d)
        inter = d[0] * d[1]
        den = B[4, :a, k, None] + B[4, :a, k + 1 :]
        den -= inter
        # Padding has zero area and overlap, so IoU 0; a kept box is never degenerate.
        s = (inter / den) > iou_thr
        s &= alive[:a, k + 1 :]
        s &= alive[:a, k, None]
        alive[:a, k + 1 :] ^= s
        owner[:a, k + 1 :][s] = k
    owner[alive] = np.nonzero(alive)[1]  # kept boxes own themselves
    return lay, owner


def soft_nms_keep(
    p: Prepared, method: int, iou_thr: float, sigma: float, thresh: float
) -> tuple[Layout, np.ndarray, np.ndarray]:
    """ensemble-boxes' ``cpu_soft_nms_float`` for every class at once.

    Returns the layout (input order within each class) and a (rows, nmax) array holding, at the
    position each box ends up in after the selection swaps, its prepared-box index, with -1 for boxes
    whose decayed score fell to ``thresh`` or below; and the decayed scores in the same layout.
    """
    lay = layout(p, None, None)
    valid = lay.index >= 0
    n_rows, nmax = lay.index.shape
    # Channel-first, one array for what moves together: x1, y1, x2, y2, area, prepared index.
    D = np.zeros((6, n_rows, nmax))
    b = p.boxes.astype(np.float64)[lay.index[valid]]
    D[:4, valid] = b.T
    D[4, valid] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    D[5] = -1
    D[5, valid] = lay.index[valid]
    sc_dtype = p.scores.dtype if p.scores.dtype.kind == "f" else np.float64
    scores = np.full((n_rows, nmax), -np.inf, dtype=sc_dtype)
    scores[valid] = p.scores[lay.index[valid]]
    ar = np.arange(n_rows)
    for i in range(nmax - 1):
        a = int(lay.active[i + 1])  # rows with a box after position i
        if a == 0:
            break
        rest = scores[:a, i + 1 :]
        maxpos = rest.argmax(axis=1)
        swap = np.flatnonzero(scores[:a, i] < rest[ar[:a], maxpos])
        if swap.size:
            j = maxpos[swap] + i + 1
            tmp = D[:, swap, i]
            D[:, swap, i] = D[:, swap, j]
            D[:, swap, j] = tmp
            tmp = scores[swap, i]
            scores[swap, i] = scores[swap, j]
            scores[swap, j] = tmp
        # Column order y1, x1, y2, x2 as the reference writes it; the product is the same.  Padding
        # (all zeros) gets IoU 0, hence weight 1, and stays -inf.
        xx1 = np.maximum(D[1, :a, i, None], D[1, :a, i + 1 :])
        yy1 = np.maximum(D[0, :a, i, None], D[0, :a, i + 1 :])
        xx2 = np.minimum(D[3, :a, i, None], D[3, :a, i + 1 :])
        yy2 = np.minimum(D[2, :a, i, None], D[2, :a, i + 1 :])
        w = np.maximum(0.0, xx2 - xx1)
        h = np.maximum(0.0, yy2 - yy1)
        inter = w * h
        ovr = inter / (D[4, :a, i, None] + D[4, :a, i + 1 :] - inter)
        if method == 1:
            weight = np.where(ovr > iou_thr, 1.0 - ovr, 1.0)
        elif method == 2:
            weight = np.exp(-(ovr * ovr) / sigma)
        else:
            weight = np.where(ovr > iou_thr, 0.0, 1.0)
        np.multiply(weight, scores[:a, i + 1 :], out=scores[:a, i + 1 :])
    idx = D[5].astype(np.int64)
    kept = np.where((idx >= 0) & (scores > thresh), idx, -1)
    return lay, kept, scores
