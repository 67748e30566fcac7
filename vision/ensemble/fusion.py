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
_CHUNK_BOXES = 12_000


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
            f"incorrect number of weights {len(weights)}, must be {n_models}; set to 1", stacklevel=4
        )
        return np.ones(n_models)
    return np.array(weights)


def _members(boxes_list, source: np.ndarray, out_row: np.ndarray) -> list[np.ndarray]:
    """Per model, the output row of each input box (-1 where dropped)."""
    sizes = [len(b) for b in boxes_list]
    dest = np.full(sum(sizes), -1, dtype=np.int64)
    dest[source] = out_row
    return np.split(dest, np.cumsum(sizes)[:-1]) if sizes else []


def _wbf_batch(images, weights, iou_thr, skip_box_thr, conf_type, allows_overflow, members=True) -> list[Fusion]:
    if conf_type not in _wbf.CONF_TYPES:
        raise ValueError(f"unknown conf_type {conf_type!r}, must be one of {', '.join(_wbf.CONF_TYPES)}")
    w = _weights_array(weights, len(images[0][0]) if images else 0)
    parts = [_wbf.prefilter(b, s, lab, w, skip_box_thr) for b, s, lab in images]
    if len(parts) == 1:
        p = parts[0]
        image = np.zeros(p.score.size, dtype=np.int64)
    else:
        p = _wbf.Prefiltered(*(np.concatenate(x) for x in zip(*parts)))
        image = np.repeat(np.arange(len(images)), [q.score.size for q in parts])
    with np.errstate(invalid="ignore", divide="ignore"):  # zero scores give 0/0 there too
        r = _wbf.wbf(p, image, len(images), w, iou_thr, conf_type, allows_overflow, members)
    if not members:
        return [Fusion(r.boxes[i], r.scores[i], r.labels[i], []) for i in range(len(images))]
    out_rows = np.split(r.box_out, np.cumsum([q.score.size for q in parts])[:-1])
    return [
        Fusion(r.boxes[i], r.scores[i], r.labels[i], _members(images[i][0], parts[i].source, out_rows[i]))
        for i in range(len(images))
    ]


def _empty(p: _nms.Prepared, boxes_list) -> Fusion:
    return Fusion(
        np.zeros((0, 4), dtype=p.boxes.dtype),
        np.zeros(0, dtype=p.scores.dtype),
        np.zeros(0, dtype=p.labels.dtype),
        [np.full(len(b), -1, dtype=np.int64) for b in boxes_list],
    )


def _concat(parts: list[_nms.Prepared]) -> _nms.Prepared:
    image = np.repeat(np.arange(len(parts)), [q.scores.size for q in parts])
    return _nms.Prepared(*(np.concatenate(x) for x in zip(*(q[:4] for q in parts))), image)


def _kept_slots(lay: _nms.Layout, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, position) of kept slots ordered by group (image, label) then position, and their images."""
    r, k = np.nonzero(kept)
    order = np.lexsort((k, lay.row_gid[r]))
    r, k = r[order], k[order]
    return r, k, lay.group_image[lay.row_gid[r]]


def _nms_batch(
    images, method, iou_thr, sigma, thresh, weights, skip_box_thr=None, score_sum=False, clip=True, decayed=False
):
    parts = [_nms.prepare(b, s, lab, weights, skip_box_thr) for b, s, lab in images]
    p = _concat(parts)
    if p.scores.size == 0:
        return [_empty(q, im[0]) for q, im in zip(parts, images)]
    if method == 3:
        lay, owner = _nms.greedy_nms(p, iou_thr, stable=score_sum)
        r, k, img = _kept_slots(lay, owner == np.arange(owner.shape[1])[None, :])
        idx = lay.index[r, k]
        valid = lay.index >= 0
        slot_of_box = np.full(p.scores.size, -1, dtype=np.int64)
        kept_slot = np.full(owner.shape, -1, dtype=np.int64)
        kept_slot[r, k] = np.arange(r.size)
        rows = np.nonzero(valid)[0]
        slot_of_box[lay.index[valid]] = kept_slot[rows, owner[valid]]
    else:
        lay, kept_idx, decayed_scores = _nms.soft_nms_keep(p, method, iou_thr, sigma, thresh)
        r, k, img = _kept_slots(lay, kept_idx >= 0)
        idx = kept_idx[r, k]
        slot_of_box = np.full(p.scores.size, -1, dtype=np.int64)
        slot_of_box[idx] = np.arange(idx.size)
    fused_scores = decayed_scores[r, k] if decayed and method != 3 else p.scores[idx]
    if score_sum:
        fused_scores = np.bincount(
            slot_of_box[slot_of_box >= 0], weights=p.scores[slot_of_box >= 0].astype(np.float64), minlength=idx.size
        )
        if clip:
            fused_scores = np.minimum(fused_scores, 1.0)
    bounds = np.searchsorted(img, np.arange(len(images) + 1))
    box_bounds = np.concatenate(([0], np.cumsum([q.scores.size for q in parts])))
    out = []
    for i, (q, im) in enumerate(zip(parts, images)):
        lo, hi = bounds[i], bounds[i + 1]
        sel = np.arange(lo, hi)
        local_slot = slot_of_box[box_bounds[i] : box_bounds[i + 1]]
        if score_sum:
            # Highest fused score first; ties keep the per-label order.
            o = np.argsort(-fused_scores[lo:hi], kind="stable")
            sel = sel[o]
            rank = np.empty(o.size, dtype=np.int64)
            rank[o] = np.arange(o.size)
            local_out = np.where(local_slot >= 0, rank[np.maximum(local_slot - lo, 0)], -1)
        else:
            local_out = np.where(local_slot >= 0, local_slot - lo, -1)
        g = idx[sel]
        out.append(Fusion(p.boxes[g], fused_scores[sel], p.labels[g], _members(im[0], q.source, local_out)))
    return out


def nms_method(boxes, scores, labels, method=3, iou_thr=0.5, sigma=0.5, thresh=0.001, weights=None):
    """ensemble-boxes' ``nms_method``: 1 linear soft-NMS, 2 Gaussian soft-NMS, 3 hard NMS.

    Scores are multiplied by ``weights[t] / sum(weights)`` when weights are given.  Output is grouped
    by label (ascending), each group in the order boxes were kept; soft-NMS returns the kept boxes'
    original (weighted, undecayed) scores, as ensemble-boxes does.
    """
    f = _nms_batch([(boxes, scores, labels)], method, iou_thr, sigma, thresh, weights)[0]
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
    f = _wbf_batch(
        [(boxes_list, scores_list, labels_list)], weights, iou_thr, skip_box_thr, conf_type, allows_overflow,
        members=False,
    )[0]
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
    Boxes keep the kept box's coordinates (clipped to [0, 1]).  Output is sorted by fused score,
    highest first.
    """
    f = fuse(boxes_list, scores_list, labels_list, "sum", weights, iou_thr, skip_box_thr, clip=clip)
    return f.boxes, f.scores, f.labels


def fuse_batch(
    images,
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
    decayed_scores: bool = False,
    members: bool = True,
) -> list[Fusion]:
    """``fuse`` for many images at once: ``images`` is a sequence of (boxes_list, scores_list, labels_list).

    Each image's result equals ``fuse`` on that image alone, but every image's classes advance
    together, so a whole results file costs about as many vectorised steps as its busiest class.
    ``members=False`` skips WBF's membership bookkeeping (``Fusion.members`` is then empty).
    """
    if method not in METHODS:
        raise ValueError(f"unknown fusion method {method!r}, must be one of {', '.join(METHODS)}")
    images = list(images)
    if not images:
        return []
    # Chunks of about _CHUNK_BOXES boxes: big enough to share the per-step cost, small enough that
    # the padded per-class state stays in cache.
    sizes = np.array([sum(len(b) for b in im[0]) for im in images])
    if len(images) > 1 and sizes.sum() > _CHUNK_BOXES:
        out: list[Fusion] = []
        start = 0
        while start < len(images):
            stop = start + max(1, int(np.searchsorted(np.cumsum(sizes[start:]), _CHUNK_BOXES, side="right")))
            out += fuse_batch(images[start:stop], method, weights, iou_thr, skip_box_thr, conf_type=conf_type,
                              allows_overflow=allows_overflow, soft_method=soft_method, sigma=sigma,
                              thresh=thresh, clip=clip, decayed_scores=decayed_scores, members=members)
            start = stop
        return out
    if method == "wbf":
        thr = 0.55 if iou_thr is None else iou_thr
        return _wbf_batch(images, weights, thr, skip_box_thr, conf_type, allows_overflow, members)
    thr = 0.5 if iou_thr is None else iou_thr
    if method == "sum":
        w = _weights_array(weights, len(images[0][0]))
        return _nms_batch(images, 3, thr, sigma, thresh, w, skip_box_thr, score_sum=True, clip=clip)
    m = 3 if method == "nms" else soft_method
    return _nms_batch(images, m, thr, sigma, thresh, weights, skip_box_thr, decayed=decayed_scores)


def fuse(
    boxes_list,
    scores_list,
    labels_list,
    method: str = "wbf",
    weights=None,
    iou_thr: float | None = None,
    skip_box_thr: float = 0.0,
    **options,
) -> Fusion:
    """Run one fusion method by name (``nms``, ``soft_nms``, ``wbf``, ``sum``) and keep membership.

    ``iou_thr`` defaults to each method's ensemble-boxes default (0.55 for WBF, 0.5 otherwise).
    ``skip_box_thr`` drops boxes scoring below it before any method runs (ensemble-boxes' NMS has no
    such argument).  ``options``: ``conf_type``, ``allows_overflow`` (WBF), ``soft_method`` (1 linear,
    2 Gaussian), ``sigma``, ``thresh`` (soft-NMS), ``decayed_scores`` (soft-NMS: return the decayed
    scores, as soft-NMS is usually meant, instead of ensemble-boxes' original ones), ``clip`` (score-sum).
    """
    return fuse_batch([(boxes_list, scores_list, labels_list)], method, weights, iou_thr, skip_box_thr, **options)[0]
