"""Mask fusion: the fused box's mask is the score-weighted mean of its members' masks.

Box fusion reports, for every input box, the output box it went to (``Fusion.members``); this module
turns that membership into masks, so instance segmentation ensembles the same way boxes do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def fuse_masks(
    masks_list: Sequence[np.ndarray],
    scores_list: Sequence[np.ndarray],
    members: Sequence[np.ndarray],
    n_out: int,
    weights: Sequence[float] | None = None,
) -> np.ndarray:
    """Score-weighted mean mask of each fused box.

    ``masks_list[t]`` is model ``t``'s masks, (N_t, H, W) (binary or soft, any numeric dtype);
    ``members[t]`` comes from ``fuse(...).members``.  Each member counts with weight
    ``score * weights[t]`` (the weight WBF gives its coordinates).  Returns float32 (n_out, H, W) in
    [0, 1] for binary inputs; threshold at 0.5 for a binary mask.  A fused box with no member masks
    (or only zero-score members) gets an all-zero mask.
    """
    if len(masks_list) != len(members) or len(scores_list) != len(members):
        raise ValueError("masks_list, scores_list and members must have one entry per model")
    shape = next((np.shape(m)[1:] for m in masks_list if np.shape(m)[0] > 0), None)
    if shape is None:
        return np.zeros((n_out, 0, 0), dtype=np.float32)
    w = np.ones(len(members)) if weights is None else np.asarray(weights, dtype=np.float64)
    acc = np.zeros((n_out, *shape), dtype=np.float64)
    total = np.zeros(n_out, dtype=np.float64)
    for t, (masks, scores, dest) in enumerate(zip(masks_list, scores_list, members)):
        dest = np.asarray(dest)
        take = np.flatnonzero(dest >= 0)
        if take.size == 0:
            continue
        masks = np.asarray(masks)
        if masks.shape[1:] != shape:
            raise ValueError(f"model {t}: masks are {masks.shape[1:]}, expected {shape}")
        coef = np.asarray(scores, dtype=np.float64)[take] * w[t]
        # Several members of one model can land in the same output: accumulate, don't overwrite.
        np.add.at(acc, dest[take], coef[:, None, None] * masks[take].astype(np.float64))
        np.add.at(total, dest[take], coef)
    out = np.zeros_like(acc)
    ok = total > 0
    out[ok] = acc[ok] / total[ok, None, None]
    return out.astype(np.float32)
