"""Sort orders that reproduce ensemble-boxes' tie-breaking.

A fast fusion must pick the same box as ensemble-boxes when two boxes of one class have exactly the
same score, or its output differs (a different box survives NMS, or boxes join a different WBF
cluster).  ensemble-boxes sorts with ``argsort()[::-1]``: NumPy's default sort for WBF, and Numba's
quicksort inside its jitted hard NMS.  Neither is stable, so the order among equal scores is whatever
those algorithms produce.  The fast path sorts everything at once with a stable lexsort and only re-sorts
the few groups that actually contain ties with the reference algorithm.
"""

from __future__ import annotations

import math

import numpy as np

_SMALL_QUICKSORT = 15


def _lt(a: float, b: float) -> bool:
    # Numba's float comparison for sorting: NaN sorts last.
    return a < b or (math.isnan(b) and not math.isnan(a))


def numba_quicksort_argsort(values: np.ndarray) -> np.ndarray:
    """``np.argsort(values)`` as Numba's jitted quicksort computes it (same order among ties).

    A line-by-line port of ``numba.misc.quicksort`` (median-of-three partition, insertion sort below
    16 items), in plain Python: it only runs on the rare class groups with tied scores.
    """
    a = [float(v) for v in np.asarray(values).ravel()]
    r = list(range(len(a)))
    if len(a) < 2:
        return np.asarray(r, dtype=np.intp)

    def insertion_sort(low: int, high: int) -> None:
        if high <= low:
            return
        for i in range(low + 1, high + 1):
            k = r[i]
            v = a[k]
            j = i
            while j > low and _lt(v, a[r[j - 1]]):
                r[j] = r[j - 1]
                j -= 1
            r[j] = k

    def partition(low: int, high: int) -> int:
        mid = (low + high) >> 1
        if _lt(a[r[mid]], a[r[low]]):
            r[low], r[mid] = r[mid], r[low]
        if _lt(a[r[high]], a[r[mid]]):
            r[high], r[mid] = r[mid], r[high]
        if _lt(a[r[mid]], a[r[low]]):
            r[low], r[mid] = r[mid], r[low]
        pivot = a[r[mid]]
        r[high], r[mid] = r[mid], r[high]
        i = low
        j = high - 1
        while True:
            while i < high and _lt(a[r[i]], pivot):
                i += 1
            while j >= low and _lt(pivot, a[r[j]]):
                j -= 1
            if i >= j:
                break
            r[i], r[j] = r[j], r[i]
            i += 1
            j -= 1
        r[i], r[high] = r[high], r[i]
        return i

    stack = [(0, len(a) - 1)]
    while stack:
        low, high = stack.pop()
        while high - low >= _SMALL_QUICKSORT:
            i = partition(low, high)
            if high - i > i - low:
                if high > i:
                    stack.append((i + 1, high))
                high = i - 1
            else:
                if i > low:
                    stack.append((low, i - 1))
                low = i + 1
        insertion_sort(low, high)
    return np.asarray(r, dtype=np.intp)


def grouped_descending_order(group: np.ndarray, score: np.ndarray, argsort) -> np.ndarray:
    """Indices sorted by group (ascending), then within a group as ``argsort(score_of_group)[::-1]``.

    ``argsort`` is the reference's sort (NumPy's ``np.argsort`` or ``numba_quicksort_argsort``), applied
    to the group's scores in input order; it is only called for groups that hold tied scores, since
    without ties every sort gives the same descending order.
    """
    if score.size < 2:
        return np.arange(score.size)
    # Descending score (any order among ties, fixed below), then a stable sort by group.
    order = np.argsort(-score)
    g = group[order]
    if int(group.max()) < 65536:
        g = g.astype(np.uint16)  # NumPy radix-sorts 16-bit keys
    order = order[np.argsort(g, kind="stable")]
    s = score[order]
    g = group[order]
    tied = (s[1:] == s[:-1]) & (g[1:] == g[:-1])
    if not tied.any():
        return order
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], order.size]
    tied_groups = np.unique(g[1:][tied])
    seg_of_group = {int(g[st]): (st, en) for st, en in zip(starts, ends)}
    order = order.copy()
    for gid in tied_groups:
        st, en = seg_of_group[int(gid)]
        idx = np.sort(order[st:en])  # the group's items in input order
        order[st:en] = idx[argsort(score[idx])[::-1]]
    return order
