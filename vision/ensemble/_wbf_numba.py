"""Weighted-boxes-fusion clustering compiled with Numba.

The NumPy lock-step path (``_wbf._cluster_lockstep``) pays about 30 array calls per step, and an image
needs as many steps as its largest class has boxes; compiled, the same clustering runs box by box with
no per-call overhead.  Both fill the same state with the same arithmetic, so either gives
ensemble-boxes' clusters; the tests run both against ensemble-boxes.
"""

from __future__ import annotations

import numba
import numpy as np


def _jit(fn):
    """``numba.njit`` with the on-disk cache where Numba finds a writable folder for it (the package's
    ``__pycache__``, ``NUMBA_CACHE_DIR`` or the user's cache folder), in memory only where it finds none
    (a read-only installation and HOME): Numba refuses ``cache=True`` there instead of falling back."""
    options = {"nogil": True, "error_model": "numpy"}  # error_model: IEEE 0/0 = NaN, as NumPy
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(cache=False, **options)(fn)


@_jit
def _np_maximum(a, b):
    return a if (a >= b or a != a) else b


@_jit
def _np_minimum(a, b):
    return a if (a <= b or a != a) else b


@_jit
def cluster_rows(BT, BVT, row_sizes, iou_thr, label_f32_exact, X2, member_t, n_clusters):
    """Cluster each row's boxes (sorted by descending score) in turn.

    BT / BVT: (5, nmax, G) boxes as x1, y1, -x2, -y2, area and their score-weighted coordinates plus
    score.  X2: (10, nmax * G) cluster state at ``cluster * G + row`` (float32-valued coordinate sums,
    score sum, fused box with negated x2, y2, its area).  Fills X2, member_t (each box's cluster) and
    n_clusters.
    """
    G = BT.shape[2]
    counts = np.zeros(BT.shape[1], dtype=np.int64)  # members per cluster of the current row
    for r in range(G):
        exact = label_f32_exact[r]
        nc = 0
        for k in range(row_sizes[r]):
            bx1, by1, nbx2, nby2, barea = BT[0, k, r], BT[1, k, r], BT[2, k, r], BT[3, k, r], BT[4, k, r]
            best = -1
            best_iou = -np.inf
            for j in range(nc):
                i = j * G + r
                if not exact and counts[j] > 1:
                    iou = -1.0  # its float32 label no longer equals the box's label
                else:
                    # ensemble-boxes: max(min(x2) - max(x1), 0) * max(min(y2) - max(y1), 0), each factor negated
                    d0 = _np_maximum(X2[5, i], bx1) + _np_maximum(X2[7, i], nbx2)
                    d1 = _np_maximum(X2[6, i], by1) + _np_maximum(X2[8, i], nby2)
                    inter = _np_minimum(d0, 0.0) * _np_minimum(d1, 0.0)
                    iou = inter / (X2[9, i] + barea - inter)
                if iou != iou:  # NumPy's argmax returns the first NaN
                    best = j
                    best_iou = iou
                    break
                if best < 0 or iou > best_iou:
                    best = j
                    best_iou = iou
            matched = best >= 0 and not best_iou <= iou_thr
            c = best if matched else nc
            i = c * G + r
            for ch in range(4):
                X2[ch, i] = np.float64(np.float32(X2[ch, i] + BVT[ch, k, r]))
            X2[4, i] += BVT[4, k, r]
            if matched:
                for ch in range(4):
                    X2[5 + ch, i] = np.float64(np.float32(X2[ch, i] / X2[4, i]))
                X2[9, i] = (X2[7, i] + X2[5, i]) * (X2[8, i] + X2[6, i])
                counts[c] += 1
            else:
                for ch in range(5):
                    X2[5 + ch, i] = BT[ch, k, r]
                counts[c] = 1
                nc += 1
            member_t[k, r] = c
        n_clusters[r] = nc
