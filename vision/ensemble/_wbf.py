"""Weighted boxes fusion, vectorised across classes, with ensemble-boxes' exact arithmetic.

ensemble-boxes clusters the boxes of one class one at a time (highest score first) against the running
fused boxes, so the algorithm is sequential within a class.  It is independent across classes, though,
so this implementation advances every class in lock-step: step ``k`` takes the k-th box of every class
at once and matches it against that class's current clusters with array operations.  The number of
Python-level steps is the size of the largest class, not the number of boxes.

To give the same clusters (not merely close ones) the arithmetic follows ensemble-boxes operation by
operation: a fused box is accumulated in float32 from float64 products, divided by the float64 score
sum and stored back as float64; a one-member cluster keeps its raw float64 row; the IoU is computed
with the same expression order.  A box therefore lands in the same cluster even when its IoU sits
within rounding of the threshold.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from vision.ensemble._sort import grouped_descending_order

CONF_TYPES = ("avg", "max", "box_and_model_avg", "absent_model_aware_avg")


class Prefiltered(NamedTuple):
    """The boxes that pass ensemble-boxes' prefilter, concatenated over models."""

    coords: np.ndarray  # (N, 4) float64, swapped and clipped
    score: np.ndarray  # (N,) float64, score * model weight
    weight: np.ndarray  # (N,) float64, model weight
    model: np.ndarray  # (N,) int64
    label: np.ndarray  # (N,) int64
    source: np.ndarray  # (N,) int64, index into the concatenation of all inputs


def prefilter(boxes_list, scores_list, labels_list, weights: np.ndarray, thr: float) -> Prefiltered:
    """Drop low scores and zero-area boxes, swap and clip coordinates (ensemble-boxes' ``prefilter_boxes``)."""
    bs, ss, ls, ms, ws = [], [], [], [], []
    for t in range(len(boxes_list)):
        n = len(boxes_list[t])
        if len(scores_list[t]) != n:
            raise ValueError(f"model {t}: {n} boxes but {len(scores_list[t])} scores")
        if len(labels_list[t]) != n:
            raise ValueError(f"model {t}: {n} boxes but {len(labels_list[t])} labels")
        if n == 0:
            continue
        bs.append(np.asarray(boxes_list[t], dtype=np.float64).reshape(n, -1)[:, :4])
        ss.append(np.asarray(scores_list[t], dtype=np.float64).reshape(n))
        ls.append(np.asarray(labels_list[t]).reshape(n).astype(np.int64))
        ms.append(np.full(n, t, dtype=np.int64))
        ws.append(np.full(n, weights[t]))
    if not bs:
        e = np.zeros(0)
        ei = np.zeros(0, dtype=np.int64)
        return Prefiltered(np.zeros((0, 4)), e, e, ei, ei, ei)
    b = np.concatenate(bs)
    s = np.concatenate(ss)
    w = np.concatenate(ws)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    sx = x2 < x1
    x1, x2 = np.where(sx, x2, x1), np.where(sx, x1, x2)
    sy = y2 < y1
    y1, y2 = np.where(sy, y2, y1), np.where(sy, y1, y2)
    xy = np.stack([x1, y1, x2, y2], axis=1)
    outside_low, outside_high = xy < 0, xy > 1
    if outside_low.any() or outside_high.any():
        warnings.warn("box coordinates outside [0, 1] were clipped", stacklevel=4)
        xy = np.where(outside_low, 0.0, np.where(outside_high, 1.0, xy))
    keep = ~(s < thr) & ((xy[:, 2] - xy[:, 0]) * (xy[:, 3] - xy[:, 1]) != 0.0)
    idx = np.flatnonzero(keep)
    return Prefiltered(
        xy[idx],
        s[idx] * w[idx],
        w[idx].astype(np.float64),
        np.concatenate(ms)[idx],
        np.concatenate(ls)[idx],
        idx,
    )


def _iou_rows(fused: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of each row's new box with that row's clusters, in ensemble-boxes' expression order.

    ``fused`` is (rows, clusters, 5) and ``box`` (rows, 5): x1, y1, x2, y2, area.  x and y are
    handled together (same elementwise operations, fewer calls).
    """
    lo = np.maximum(fused[..., :2], box[:, None, :2])
    hi = np.minimum(fused[..., 2:4], box[:, None, 2:4])
    d = hi - lo
    np.maximum(d, 0, out=d)
    inter = d[..., 0] * d[..., 1]
    return inter / (fused[..., 4] + box[:, None, 4] - inter)


class WbfResult(NamedTuple):
    """Per-image outputs of a batched fusion."""

    boxes: list[np.ndarray]
    scores: list[np.ndarray]
    labels: list[np.ndarray]
    box_out: np.ndarray  # per prefiltered box: its output row within its image


def wbf(
    p: Prefiltered,
    image: np.ndarray,
    n_images: int,
    weights: np.ndarray,
    iou_thr: float,
    conf_type: str,
    allows_overflow: bool,
) -> WbfResult:
    """Fuse prefiltered boxes of one or many images (``image`` gives each box's image).

    Classes of different images are independent groups, so fusing a whole results file at once costs
    about as many steps as fusing one image.
    """
    n_total = p.score.size
    empty = (np.zeros((0, 4)), np.zeros((0,)), np.zeros((0,)))
    if n_total == 0:
        return WbfResult(*([e] * n_images for e in empty), np.zeros(0, dtype=np.int64))
    n_models = len(weights)

    # Groups = (image, class), ordered by image then first appearance (ensemble-boxes keeps a dict).
    _, label_idx = np.unique(p.label, return_inverse=True)
    key = image * (int(label_idx.max()) + 1) + label_idx.reshape(-1)
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    n_groups = first.size
    by_first = np.argsort(first)
    gid_of_uniq = np.empty(n_groups, dtype=np.int64)
    gid_of_uniq[by_first] = np.arange(n_groups)
    gid = gid_of_uniq[inv.reshape(-1)]
    group_label = p.label[first[by_first]]
    group_image = image[first[by_first]]
    order = grouped_descending_order(gid, p.score, np.argsort)

    sizes = np.bincount(gid, minlength=n_groups)
    # Internal rows: groups by size, largest first, so the groups still active at step k are a prefix.
    row_gid = np.argsort(-sizes, kind="stable")
    row_of_gid = np.empty(n_groups, dtype=np.int64)
    row_of_gid[row_gid] = np.arange(n_groups)
    row_sizes = sizes[row_gid]
    nmax = int(row_sizes[0])
    sg = gid[order]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    pos = np.arange(n_total) - starts[sg]
    rows = row_of_gid[sg]

    def padded(values, fill=0.0):
        out = np.full((n_groups, nmax, *values.shape[1:]), fill, dtype=values.dtype)
        out[rows, pos] = values[order]
        return out

    S = padded(p.score)
    B = padded(p.coords)
    B5 = np.concatenate([B, ((B[..., 2] - B[..., 0]) * (B[..., 3] - B[..., 1]))[..., None]], axis=2)
    BV = np.concatenate([S[..., None] * B, S[..., None]], axis=2)

    label_row = group_label[row_gid]
    # A multi-member cluster stores its label as float32; if that rounds, ensemble-boxes never matches it again.
    label_f32_exact = np.float32(label_row).astype(np.float64) == label_row.astype(np.float64)
    check_label = not label_f32_exact.all()

    # Flat (row * nmax + cluster) state: fused box and its area; float32-valued coordinate sums and the
    # float64 score sum.  Clusters not created yet sit outside [0, 1] with zero area, so their IoU with
    # any box is 0 and they are never matched (a match needs IoU > iou_thr; masked explicitly if < 0).
    size = n_groups * nmax
    fused = np.zeros((size, 5))
    fused[:, :4] = 3.0
    accum = np.zeros((size, 5))
    n_clusters = np.zeros(n_groups, dtype=np.int64)
    member = np.zeros((n_groups, nmax), dtype=np.int64)
    row_base = np.arange(n_groups) * nmax
    arange_rows = np.arange(n_groups)
    active = np.searchsorted(-row_sizes, -np.arange(nmax), side="left")  # rows with size > k
    cols = np.arange(nmax)
    mask_unmatchable = iou_thr < 0 or check_label
    fused3 = fused.reshape(n_groups, nmax, 5)

    a = int(active[0])
    fused[row_base[:a]] = B5[:a, 0]
    accum[row_base[:a]] = BV[:a, 0]
    n_clusters[:a] = 1
    for k in range(1, nmax):
        a = int(active[k])
        b5 = B5[:a, k]
        iou = _iou_rows(fused3[:a, :k], b5)
        if mask_unmatchable:
            invalid = cols[None, :k] >= n_clusters[:a, None]
            if check_label:
                count2 = np.bincount(
                    (row_base[:, None] + member[:, :k]).ravel()[(cols[None, :k] < row_sizes[:, None]).ravel()],
                    minlength=size,
                ).reshape(n_groups, nmax)
                invalid |= (count2[:a, :k] > 1) & ~label_f32_exact[:a, None]
            iou[invalid] = -1
        best = iou.argmax(axis=1)
        match = iou[arange_rows[:a], best] > iou_thr
        c = np.where(match, best, n_clusters[:a])
        fi = row_base[:a] + c
        new = accum[fi] + BV[:a, k]
        acc32 = new[:, :4].astype(np.float32)
        g = np.empty((a, 5))
        g[:, :4] = (acc32 / new[:, 4:]).astype(np.float32)
        wh = g[:, 2:4] - g[:, :2]
        g[:, 4] = wh[:, 0] * wh[:, 1]
        new[:, :4] = acc32
        accum[fi] = new
        fused[fi] = np.where(match[:, None], g, b5)
        member[:a, k] = c
        n_clusters[:a] += ~match

    # Per-cluster statistics, accumulated in the order members joined (as ensemble-boxes sums them).
    filled = cols[None, :] < row_sizes[:, None]
    km = (row_base[:, None] + member).T[filled.T]  # step-major: the order boxes joined their clusters
    count = np.bincount(km, minlength=size)
    wsum = np.zeros(size)
    np.add.at(wsum, km, padded(p.weight).T[filled.T])
    cmax = np.full(size, -np.inf)
    np.maximum.at(cmax, km, S.T[filled.T])
    present = np.zeros((size, n_models), dtype=bool)
    present[km, padded(p.model).T[filled.T]] = True

    # Clusters in ensemble-boxes' concatenation order: groups by (image, first appearance), clusters
    # by creation.
    valid = (cols[None, :] < n_clusters[:, None])[row_of_gid].ravel()
    flat = (row_base[row_of_gid][:, None] + cols[None, :]).ravel()[valid]
    cnt = count[flat]
    single = cnt == 1
    conf = accum[flat, 4]
    if conf_type == "max":
        stored_score = np.where(single, conf, np.float32(cmax[flat]))
    else:
        stored_score = np.where(single, conf, np.float32(conf / cnt))
    stored_score = stored_score.astype(np.float64)
    wsum = wsum[flat]
    stored_w = np.where(single, wsum, np.float32(wsum).astype(np.float64))
    n_per_gid = np.bincount(np.repeat(np.arange(n_groups), nmax)[valid], minlength=n_groups)
    lab = np.repeat(group_label, n_per_gid).astype(np.float64)
    lab = np.where(single, lab, np.float32(lab).astype(np.float64))
    pres = present[flat]

    if conf_type == "box_and_model_avg":
        sc = stored_score * cnt / stored_w
        sc = sc * np.where(pres, weights[None, :], 0).sum(axis=1) / weights.sum()
    elif conf_type == "absent_model_aware_avg":
        sc = stored_score * cnt / (stored_w + np.where(pres, 0, weights[None, :]).sum(axis=1))
    elif conf_type == "max":
        sc = stored_score / weights.max()
    elif not allows_overflow:
        sc = stored_score * np.minimum(len(weights), cnt) / weights.sum()
    else:
        sc = stored_score * cnt / weights.sum()

    boxes_all = fused[flat, :4]
    per_image = np.bincount(np.repeat(group_image, n_per_gid), minlength=n_images)
    bounds = np.concatenate(([0], np.cumsum(per_image)))
    out_row = np.empty(sc.size, dtype=np.int64)
    out_b, out_s, out_l = [], [], []
    for i in range(n_images):
        lo, hi = bounds[i], bounds[i + 1]
        if lo == hi:
            out_b.append(empty[0])
            out_s.append(empty[1])
            out_l.append(empty[2])
            continue
        o = np.argsort(sc[lo:hi])[::-1]
        out_row[lo + o] = np.arange(hi - lo)
        o = o + lo
        out_b.append(boxes_all[o])
        out_s.append(sc[o])
        out_l.append(lab[o])
    # Output row of each prefiltered box, through its cluster.
    row_of_flat = np.full(size, -1, dtype=np.int64)
    row_of_flat[flat] = out_row
    box_out = np.empty(n_total, dtype=np.int64)
    box_out[order] = row_of_flat[row_base[rows] + member[rows, pos]]
    return WbfResult(out_b, out_s, out_l, box_out)
