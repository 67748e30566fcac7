"""Box fusion for ensembles: a vectorised drop-in for ensemble-boxes, plus score-sum NMS.

``nms``, ``soft_nms``, ``nms_method`` and ``weighted_boxes_fusion`` take ensemble-boxes' arguments with
its defaults and return what it returns (boxes as normalised [0, 1] x1, y1, x2, y2; scores; labels),
so ``from ensemble_boxes import weighted_boxes_fusion`` becomes
``from vision.ensemble import weighted_boxes_fusion``.  They reproduce its outputs, quirks included
(soft-NMS returns the kept boxes' undecayed scores; tied scores are broken as its sorts break them;
fused WBF boxes are rounded through float32), and they are tested against it directly.

Where ensemble-boxes prints and calls ``exit()`` (boxes, scores and labels of different lengths, an
unknown ``conf_type``) these raise ``ValueError``; where it crashes on empty input (NMS with no boxes
at all) these return empty arrays; they print nothing and never modify the caller's lists.

``fuse`` runs any method and also reports which output box each input box went to, which is what
mask fusion (``vision.ensemble.masks``) needs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from vision.ensemble import _nms, _wbf

METHODS = ("nms", "soft_nms", "wbf", "sum")


@dataclass
class Fusion:
    """Fused boxes plus cluster membership.

    ``members[t][j]`` is the output row that input box ``j`` of model ``t`` went to: its WBF cluster,
    the NMS / score-sum box that kept or suppressed it, or (soft-NMS) itself when kept; -1 when the
    box was dropped (below the score threshold, zero area, or removed by soft-NMS).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    members: list[np.ndarray]


def _weights_array(weights, n_models: int) -> np.ndarray:
    if weights is None:
        return np.ones(n_models)
    if len(weights) != n_models:
        warnings.warn(
            f"incorrect number of weights {len(weights)}, must be {n_models}; set to 1", stacklevel=3
        )
        return np.ones(n_models)
    return np.array(weights)


def _split(dest: np.ndarray, boxes_list) -> list[np.ndarray]:
    sizes = [len(b) for b in boxes_list]
    return np.split(dest, np.cumsum(sizes)[:-1]) if sizes else []


def _members(boxes_list, source: np.ndarray, out_row: np.ndarray) -> list[np.ndarray]:
    total = sum(len(b) for b in boxes_list)
    dest = np.full(total, -1, dtype=np.int64)
    dest[source] = out_row
    return _split(dest, boxes_list)


def _wbf_fusion(boxes_list, scores_list, labels_list, weights, iou_thr, skip_box_thr, conf_type, allows_overflow):
    w = _weights_array(weights, len(boxes_list))
    if conf_type not in _wbf.CONF_TYPES:
        raise ValueError(f"unknown conf_type {conf_type!r}, must be one of {', '.join(_wbf.CONF_TYPES)}")
    p = _wbf.prefilter(boxes_list, scores_list, labels_list, w, skip_box_thr)
    with np.errstate(invalid="ignore", divide="ignore"):  # zero scores give 0/0 there too
        r = _wbf.wbf(p, np.zeros(p.score.size, dtype=np.int64), 1, w, iou_thr, conf_type, allows_overflow)
    return Fusion(r.boxes[0], r.scores[0], r.labels[0], _members(boxes_list, p.source, r.box_out))


def _empty(p: _nms.Prepared, boxes_list) -> Fusion:
    return Fusion(
        np.zeros((0, 4), dtype=p.boxes.dtype),
        np.zeros(0, dtype=p.scores.dtype),
        np.zeros(0, dtype=p.labels.dtype),
        [np.full(len(b), -1, dtype=np.int64) for b in boxes_list],
    )


def _nms_fusion(boxes_list, scores_list, labels_list, method, iou_thr, sigma, thresh, weights) -> Fusion:
    p = _nms.prepare(boxes_list, scores_list, labels_list, weights)
    if p.scores.size == 0:
        return _empty(p, boxes_list)
    if method == 3:
        lay, owner = _nms.greedy_nms(p, iou_thr)
        k = np.arange(owner.shape[1])
        kept = owner == k[None, :]
        out_pos = _kept_positions(lay, kept)
        idx = lay.index[out_pos]
        out_of_slot = np.full(owner.shape, -1, dtype=np.int64)
        out_of_slot[out_pos] = np.arange(idx.size)
        valid = lay.index >= 0
        rows = np.nonzero(valid)[0]
        slot_out = out_of_slot[rows, owner[valid]]
        members = _members(boxes_list, p.source[lay.index[valid]], slot_out)
    else:
        lay, kept_idx = _nms.soft_nms_keep(p, method, iou_thr, sigma, thresh)
        out_pos = _kept_positions(lay, kept_idx >= 0)
        idx = kept_idx[out_pos]
        members = _members(boxes_list, p.source[idx], np.arange(idx.size))
    return Fusion(p.boxes[idx], p.scores[idx], p.labels[idx], members)


def _kept_positions(lay: _nms.Layout, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, position) of kept slots, ordered by class (sorted label) then position."""
    r, k = np.nonzero(kept)
    order = np.lexsort((k, lay.row_gid[r]))
    return r[order], k[order]


def _sum_fusion(boxes_list, scores_list, labels_list, iou_thr, weights, skip_box_thr, clip) -> Fusion:
    w = _weights_array(weights, len(boxes_list))
    kept_in = [np.asarray(s, dtype=np.float64).reshape(-1) >= skip_box_thr for s in scores_list]
    sub = lambda lst: [np.asarray(x)[m] if len(x) else x for x, m in zip(lst, kept_in)]  # noqa: E731
    p = _nms.prepare(sub(boxes_list), sub(scores_list), sub(labels_list), w)
    if p.scores.size == 0:
        return _empty(p, boxes_list)
    lay, owner = _nms.greedy_nms(p, iou_thr, stable=True)
    valid = lay.index >= 0
    rows = np.nonzero(valid)[0]
    r, k = np.nonzero(owner == np.arange(owner.shape[1])[None, :])
    out_of_slot = np.full(owner.shape, -1, dtype=np.int64)
    out_of_slot[r, k] = np.arange(r.size)
    slot_out = out_of_slot[rows, owner[valid]]
    fused = np.bincount(slot_out, weights=p.scores[lay.index[valid]].astype(np.float64), minlength=r.size)
    if clip:
        fused = np.minimum(fused, 1.0)
    order = np.argsort(-fused, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    idx = lay.index[r, k][order]
    # Map prepared indices back through the skip filter to the caller's rows.
    orig = np.concatenate([np.flatnonzero(m) + off for m, off in zip(kept_in, np.cumsum([0] + [len(b) for b in boxes_list])[:-1])])
    members = _members(boxes_list, orig[p.source[lay.index[valid]]], rank[slot_out])
    return Fusion(p.boxes[idx], fused[order], p.labels[idx], members)


def nms_method(boxes, scores, labels, method=3, iou_thr=0.5, sigma=0.5, thresh=0.001, weights=None):
    """ensemble-boxes' ``nms_method``: 1 linear soft-NMS, 2 Gaussian soft-NMS, 3 hard NMS.

    Scores are multiplied by ``weights[t] / sum(weights)`` when weights are given.  Output is grouped
    by label (ascending), each group in the order boxes were kept; soft-NMS returns the kept boxes'
    original (weighted, undecayed) scores, as ensemble-boxes does.
    """
    f = _nms_fusion(boxes, scores, labels, method, iou_thr, sigma, thresh, weights)
    return f.boxes, f.scores, f.labels


def nms(boxes, scores, labels, iou_thr=0.5, weights=None):
    """Hard NMS per label over all models' boxes (ensemble-boxes' ``nms``)."""
    return nms_method(boxes, scores, labels, method=3, iou_thr=iou_thr, weights=weights)


def soft_nms(boxes, scores, labels, method=2, iou_thr=0.5, sigma=0.5, thresh=0.001, weights=None):
    """Soft-NMS (ensemble-boxes' ``soft_nms``): ``method`` 1 linear, 2 Gaussian, 3 hard NMS."""
    return nms_method(
        boxes, scores, labels, method=method, iou_thr=iou_thr, sigma=sigma, thresh=thresh, weights=weights
    )


def weighted_boxes_fusion(
    boxes_list,
    scores_list,
    labels_list,
    weights=None,
    iou_thr=0.55,
    skip_box_thr=0.0,
    conf_type="avg",
    allows_overflow=False,
):
    """Weighted boxes fusion (ensemble-boxes' ``weighted_boxes_fusion``), every ``conf_type``.

    Returns boxes (float64, normalised x1, y1, x2, y2), scores and labels (float64), sorted by score,
    highest first.
    """
    f = _wbf_fusion(boxes_list, scores_list, labels_list, weights, iou_thr, skip_box_thr, conf_type, allows_overflow)
    return f.boxes, f.scores, f.labels


def score_sum_nms(boxes_list, scores_list, labels_list, iou_thr=0.5, weights=None, skip_box_thr=0.0, clip=True):
    """Score-sum NMS: a kept box collects the scores of the boxes it suppresses.

    Per label, boxes are taken in descending score (ties in input order); a box that overlaps a kept
    box with IoU above ``iou_thr`` is removed and its score added to that kept box, as in the
    Open Images 2019 winning ensemble, so agreement between models raises confidence instead of
    being thrown away.

    Normalisation: each score is first multiplied by ``weights[t] / sum(weights)`` (weights default to
    1, so by ``1 / n_models``), so an object found by every model with score ``s`` ends with ``s``, and
    one found by a single model with ``s / n_models``.  A fused score can still exceed 1 when one model
    has several overlapping boxes; ``clip`` (default) caps it at 1.0 so it stays a confidence.
    Boxes keep the kept box's coordinates.  Output is sorted by fused score, highest first.
    """
    f = _sum_fusion(boxes_list, scores_list, labels_list, iou_thr, weights, skip_box_thr, clip)
    return f.boxes, f.scores, f.labels


def fuse(
    boxes_list,
    scores_list,
    labels_list,
    method: str = "wbf",
    weights=None,
    iou_thr: float | None = None,
    skip_box_thr: float = 0.0,
    *,
    conf_type: str = "avg",
    allows_overflow: bool = False,
    soft_method: int = 2,
    sigma: float = 0.5,
    thresh: float = 0.001,
    clip: bool = True,
) -> Fusion:
    """Run one fusion method by name (``nms``, ``soft_nms``, ``wbf``, ``sum``) and keep membership.

    ``iou_thr`` defaults to each method's ensemble-boxes default (0.55 for WBF, 0.5 otherwise).
    ``skip_box_thr`` drops boxes scoring below it before any method runs (ensemble-boxes' NMS has no
    such argument, so there it filters the inputs).
    """
    if method not in METHODS:
        raise ValueError(f"unknown fusion method {method!r}, must be one of {', '.join(METHODS)}")
    if method == "wbf":
        thr = 0.55 if iou_thr is None else iou_thr
        return _wbf_fusion(
            boxes_list, scores_list, labels_list, weights, thr, skip_box_thr, conf_type, allows_overflow
        )
    thr = 0.5 if iou_thr is None else iou_thr
    if method == "sum":
        return _sum_fusion(boxes_list, scores_list, labels_list, thr, weights, skip_box_thr, clip)
    keep = [np.asarray(s, dtype=np.float64).reshape(-1) >= skip_box_thr for s in scores_list]
    sub = lambda lst: [np.asarray(x)[m] if len(x) else x for x, m in zip(lst, keep)]  # noqa: E731
    m = 3 if method == "nms" else soft_method
    f = _nms_fusion(sub(boxes_list), sub(scores_list), sub(labels_list), m, thr, sigma, thresh, weights)
    members = []
    for mask, mem in zip(keep, f.members):
        full = np.full(mask.size, -1, dtype=np.int64)
        full[mask] = mem
        members.append(full)
    return Fusion(f.boxes, f.scores, f.labels, members)
