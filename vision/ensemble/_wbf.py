"""Weighted boxes fusion with ensemble-boxes' exact arithmetic, for one image or a whole results file.

ensemble-boxes clusters the boxes of one class one at a time (highest score first) against the running
fused boxes, so the algorithm is sequential within a class but independent across classes and images.
Everything around the clustering (prefilter, grouping by (image, class), sorting with ensemble-boxes'
tie order, the per-cluster scores of every ``conf_type``) is vectorised NumPy over all boxes at once.
The clustering itself runs in a Numba kernel (``_wbf_numba``) or in a NumPy lock-step loop whose step
``k`` takes the k-th box of every class at once; the loop serves short jobs, which would spend more on
importing Numba than they save (``_choose_kernel``), and installations without Numba.

To give the same clusters (not merely close ones) the arithmetic follows ensemble-boxes operation by
operation: a fused box is accumulated in float32 from float64 products, divided by the float64 score
sum and stored back as float64; a one-member cluster keeps its raw float64 row; the IoU is computed
with the same expression order.  A box therefore lands in the same cluster even when its IoU sits
within rounding of the threshold, and the outputs are bit-identical.
"""

from __future__ import annotations

import os
import sys
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
    bs, ss, ls, ns = [], [], [], []
    for t in range(len(boxes_list)):
        n = len(boxes_list[t])
        if len(scores_list[t]) != n:
            raise ValueError(f"model {t}: {n} boxes but {len(scores_list[t])} scores")
        if len(labels_list[t]) != n:
            raise ValueError(f"model {t}: {n} boxes but {len(labels_list[t])} labels")
        ns.append(n)
        if n == 0:
            continue
        bs.append(np.asarray(boxes_list[t], dtype=np.float64).reshape(n, -1)[:, :4])
        ss.append(np.asarray(scores_list[t], dtype=np.float64).reshape(n))
        ls.append(np.asarray(labels_list[t]).reshape(n))
    if not bs:
        e = np.zeros(0)
        ei = np.zeros(0, dtype=np.int64)
        return Prefiltered(np.zeros((0, 4)), e, e, ei, ei, ei)
    model = np.repeat(np.arange(len(ns)), ns)
    return prefilter_rows(np.concatenate(bs), np.concatenate(ss), np.concatenate(ls), model, weights, thr)


def prefilter_rows(
    b: np.ndarray, s: np.ndarray, labels: np.ndarray, model: np.ndarray, weights: np.ndarray, thr: float
) -> Prefiltered:
    """``prefilter`` on boxes already concatenated (``model`` gives each row's model), for any number of
    images at once: every operation is row-wise, so one call over a whole results file (rows ordered by
    image, then model) equals the per-image calls concatenated."""
    w = np.asarray(weights)[model]
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
        model[idx],
        labels[idx].astype(np.int64),
        idx,
    )


def _first_appearance_groups(label: np.ndarray, image: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (image, label) keys as ``np.unique(key, return_index, return_inverse)`` gives them.

    Small label ranges (the usual case) use a lookup table instead of sorting.
    """
    lo, hi = int(label.min()), int(label.max())
    span = hi - lo + 1
    if span * n_images > 4_000_000:
        key = label if n_images == 1 else image * span + (label - lo)
        _, first, inv = np.unique(key, return_index=True, return_inverse=True)
        return first, inv.reshape(-1)
    key = label - lo if n_images == 1 else image * span + (label - lo)
    first_of_key = np.full(span * n_images, key.size, dtype=np.int64)
    np.minimum.at(first_of_key, key, np.arange(key.size))
    keys = np.flatnonzero(first_of_key < key.size)
    uniq_of_key = np.empty(span * n_images, dtype=np.int64)
    uniq_of_key[keys] = np.arange(keys.size)
    return first_of_key[keys], uniq_of_key[key]


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
    members: bool = True,
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
    first, inv = _first_appearance_groups(p.label, image, n_images)
    G = first.size  # number of groups
    by_first = np.argsort(first)
    gid_of_uniq = np.empty(G, dtype=np.int64)
    gid_of_uniq[by_first] = np.arange(G)
    gid = gid_of_uniq[inv.reshape(-1)]
    group_label = p.label[first[by_first]]
    group_image = image[first[by_first]]
    order = grouped_descending_order(gid, p.score, np.argsort)

    sizes = np.bincount(gid, minlength=G)
    # Internal rows: groups by size, largest first, so the groups still active at step k are a prefix.
    row_gid = np.argsort(-sizes, kind="stable")
    row_of_gid = np.empty(G, dtype=np.int64)
    row_of_gid[row_gid] = np.arange(G)
    row_sizes = sizes[row_gid]
    nmax = int(row_sizes[0])
    size = nmax * G
    sg = gid[order]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    pos = np.arange(n_total) - starts[sg]
    rows = row_of_gid[sg]
    slot = pos * G + rows  # (position, row) of each sorted box in the step-major layouts

    # Step-major layouts, (channel, position, row), so the rows one step touches are contiguous:
    # boxes as x1, y1, x2, y2, area; and score-weighted coordinates plus the score, for the sums.
    co = p.coords[order]
    so = p.score[order]
    # x2 and y2 are stored negated (exact, and rounding is symmetric) so that one np.maximum gives
    # both the intersection's low corner and its negated high corner.
    neg = co * np.array([1.0, 1.0, -1.0, -1.0])
    BT = np.zeros((5, size))
    BT[:4, slot] = neg.T
    BT[4, slot] = (co[:, 2] - co[:, 0]) * (co[:, 3] - co[:, 1])
    BVT = np.zeros((5, size))
    BVT[:4, slot] = (so[:, None] * neg).T
    BVT[4, slot] = so
    BT = BT.reshape(5, nmax, G)
    BVT = BVT.reshape(5, nmax, G)

    label_row = group_label[row_gid]
    # A multi-member cluster stores its label as float32; if that rounds, ensemble-boxes never matches it again.
    label_f32_exact = np.float32(label_row).astype(np.float64) == label_row.astype(np.float64)

    # Cluster state, (channel, cluster * G + row): rows 0-4 the float32-valued coordinate sums and the
    # float64 score sum, rows 5-9 the fused box and its area.  Clusters not created yet are the box
    # (3, 3, 3, 3), outside [0, 1] with zero area, so their IoU with any box is 0 and they are never
    # matched (a match needs IoU > iou_thr; they are masked explicitly when iou_thr < 0).
    X2 = np.zeros((10, size))
    X2[5:7] = 3.0
    X2[7:9] = -3.0
    n_clusters = np.zeros(G, dtype=np.int64)
    member_t = np.zeros((nmax, G), dtype=np.int64)
    kernel = _choose_kernel(nmax)
    if kernel is not None:
        kernel(BT, BVT, row_sizes, float(iou_thr), label_f32_exact, X2, member_t, n_clusters)
    else:
        _cluster_lockstep(BT, BVT, row_sizes, iou_thr, label_f32_exact, X2, member_t, n_clusters)
    A2 = X2[:5]
    F2 = X2[5:]

    # Per-cluster statistics; sums run in the order members joined, as ensemble-boxes adds them.
    cs = member_t[pos, rows] * G + rows  # cluster slot of each sorted box
    count = np.bincount(cs, minlength=size)
    needs_wsum = conf_type in ("box_and_model_avg", "absent_model_aware_avg")
    if needs_wsum:
        slot_rank = np.full(size, -1, dtype=np.int64)
        slot_rank[slot] = np.arange(n_total)
        joined = slot_rank[slot_rank >= 0]  # sorted boxes in step-major order
        wsum = np.bincount(cs[joined], weights=p.weight[order][joined], minlength=size)

    # Clusters in ensemble-boxes' concatenation order: groups by (image, first appearance), clusters
    # by creation.
    n_per_gid = n_clusters[row_of_gid]
    n_fused = int(n_per_gid.sum())
    gg = np.repeat(np.arange(G), n_per_gid)
    cc = np.arange(n_fused) - np.repeat(np.cumsum(n_per_gid) - n_per_gid, n_per_gid)
    flat = cc * G + row_of_gid[gg]
    cnt = count[flat]
    single = cnt == 1
    conf = A2[4, flat]
    if conf_type == "max":
        cmax = np.full(size, -np.inf)
        np.maximum.at(cmax, cs, so)
        stored_score = np.where(single, conf, np.float32(cmax[flat]))
    else:
        stored_score = np.where(single, conf, np.float32(conf / cnt))
    stored_score = stored_score.astype(np.float64)
    if needs_wsum:
        wsum = wsum[flat]
        stored_w = np.where(single, wsum, np.float32(wsum).astype(np.float64))
    lab = group_label[gg].astype(np.float64)
    lab = np.where(single, lab, np.float32(lab).astype(np.float64))

    if conf_type in ("box_and_model_avg", "absent_model_aware_avg"):
        present = np.zeros((size, n_models), dtype=bool)
        present[cs, p.model[order]] = True
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

    boxes_all = F2[:4, flat].T * np.array([1.0, 1.0, -1.0, -1.0])
    out_row = np.empty(n_fused, dtype=np.int64)
    out_b, out_s, out_l = [], [], []
    if n_images == 1:
        bounds = [0, n_fused]
    else:
        bounds = np.concatenate(([0], np.cumsum(np.bincount(group_image[gg], minlength=n_images))))
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
    if not members:
        return WbfResult(out_b, out_s, out_l, np.zeros(0, dtype=np.int64))
    # Output row of each prefiltered box, through its cluster.
    row_of_slot = np.full(size, -1, dtype=np.int64)
    row_of_slot[flat] = out_row
    box_out = np.empty(n_total, dtype=np.int64)
    box_out[order] = row_of_slot[cs]
    return WbfResult(out_b, out_s, out_l, box_out)


# The clustering itself: two implementations that fill the same state (X2, member_t, n_clusters) with
# the same arithmetic.  Both follow ensemble-boxes operation by operation: a new member's score-weighted
# coordinates are added in float64 to the float32 running sums and rounded back to float32, the fused box
# is the float64 quotient rounded to float32, and a box joins the first cluster of highest IoU unless
# that IoU is <= iou_thr (so a NaN IoU, from zero scores, matches, as NumPy's argmax picks it first).


def _cluster_lockstep(BT, BVT, row_sizes, iou_thr, label_f32_exact, X2, member_t, n_clusters) -> None:
    """Pure NumPy: step k takes the k-th box of every row at once, so the Python-level steps number the
    largest row's size, not the boxes."""
    G = BT.shape[2]
    nmax = BT.shape[1]
    check_label = not label_f32_exact.all()
    q32 = np.empty((4, G), dtype=np.float32)
    A2 = X2[:5]
    F2 = X2[5:]
    F = F2.reshape(5, nmax, G)
    counts = np.zeros((nmax, G), dtype=np.int64) if check_label else None
    ar = np.arange(G)
    cols = np.arange(nmax)
    act = np.searchsorted(-row_sizes, -np.arange(nmax), side="left").tolist()  # rows with size > k
    mask_unmatchable = iou_thr < 0 or check_label
    mul_reduce, max_reduce = np.multiply.reduce, np.maximum.reduce

    a = act[0]
    F2[:, :a] = BT[:, 0, :a]
    A2[:4, :a] = BVT[:4, 0, :a].astype(np.float32)
    A2[4, :a] = BVT[4, 0, :a]
    n_clusters[:a] = 1
    if check_label:
        counts[0, :a] = 1
    mc = 1  # no active row has more clusters than this
    maximum, minimum, divide, where, copyto = np.maximum, np.minimum, np.divide, np.where, np.copyto
    take = X2.take
    for k in range(1, nmax):
        a = act[k]
        b = BT[:, k, :a]
        Fk = F[:, :mc, :a]
        # ensemble-boxes: max(min(x2) - max(x1), 0) * max(min(y2) - max(y1), 0); here each factor
        # negated, which leaves the product exact.
        m = maximum(Fk[:4], b[:4, None])
        d = m[:2] + m[2:4]
        minimum(d, 0, out=d)
        inter = d[0] * d[1]
        den = Fk[4] + b[4]
        den -= inter
        iou = divide(inter, den, out=den)
        if mask_unmatchable:
            invalid = cols[:mc, None] >= n_clusters[None, :a]
            if check_label:
                invalid |= (counts[:mc, :a] > 1) & ~label_f32_exact[None, :a]
            iou[invalid] = -1
        best = iou.argmax(axis=0)
        ara = ar[:a]
        unmatched = iou[best, ara] <= iou_thr
        nc = n_clusters[:a]
        c = where(unmatched, nc, best)
        fi = c * G
        fi += ara
        x = take(fi, axis=1)
        x[:5] += BVT[:, k, :a]
        x[:4] = x[:4].astype(np.float32)
        q = q32[:, :a]
        divide(x[:4], x[4], out=q)  # float64 division, rounded to float32
        x[5:9] = q
        wh = x[7:9] + x[5:7]  # the negated width and height
        mul_reduce(wh, axis=0, out=x[9])
        copyto(x[5:], b, where=unmatched)
        X2[:, fi] = x
        member_t[k, :a] = c
        nc += unmatched
        if check_label:
            counts[c, ara] += 1
        mc = int(max_reduce(nc))


def compiled_kernel():
    """The Numba kernel (``_wbf_numba.cluster_rows``), or None without Numba or with ``VISION_NUMBA=0``,
    in which case the NumPy lock-step path runs.  The kernel is compiled on first use and cached on disk
    where Numba can write its cache, so only the first process pays for compiling it."""
    if os.environ.get("VISION_NUMBA", "auto") == "0":
        return None
    try:
        from vision.ensemble._wbf_numba import cluster_rows
    except ImportError:
        return None
    return cluster_rows


# Importing Numba costs about as much as 10k lock-step steps (0.5-2 s), more than the lock-step path
# loses on a typical results file (600 images x 1500 boxes: ~4000 steps, 0.25 s slower than the kernel).
_LOCKSTEP_BUDGET = 10_000
_lockstep_steps = 0


def _choose_kernel(steps: int):
    """The kernel for a clustering of ``steps`` lock-step steps, or None for the lock-step path.

    ``VISION_NUMBA=1`` always takes the kernel and ``0`` never; by default the kernel is taken when Numba
    is already imported (ensemble-boxes imports it) or once this process's lock-step work would pass
    ``_LOCKSTEP_BUDGET`` steps, so short jobs such as one ``vision fuse`` of a few thousand images do not
    pay for importing Numba and long ones pay once.
    """
    global _lockstep_steps
    mode = os.environ.get("VISION_NUMBA", "auto")
    if mode == "0":
        return None
    if mode == "1" or "numba" in sys.modules or _lockstep_steps + steps > _LOCKSTEP_BUDGET:
        kernel = compiled_kernel()
        if kernel is not None:
            return kernel
    _lockstep_steps += steps
    return None
