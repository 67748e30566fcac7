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


def decode_segmentation(seg, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = dict(seg)
        if isinstance(rle.get("counts"), str):
            rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle)


def fused_masks(members_in, members, n_out: int, w_model: np.ndarray, shape: tuple[int, int]) -> dict[int, dict]:
    """Score-weighted mean of the member masks of each fused detection, as RLE (where any member has one).

    ``members_in[t]`` is model ``t``'s (scores, segmentations) for the image; ``members[t]`` the output
    row each of those detections went to."""
    from pycocotools import mask as mask_utils

    acc: dict[int, np.ndarray] = {}
    total = np.zeros(n_out)
    for t, ((scores, segs), dest) in enumerate(zip(members_in, members)):
        for s, seg, j in zip(scores.tolist(), segs, dest.tolist()):
            if j < 0 or seg is None:
                continue
            coef = s * w_model[t]
            m = decode_segmentation(seg, *shape).astype(np.float64)
            acc[j] = acc[j] + coef * m if j in acc else coef * m
            total[j] += coef
    out = {}
    for j, a in acc.items():
        mean = a / total[j] if total[j] > 0 else a
        rle = mask_utils.encode(np.asfortranarray((mean >= 0.5).astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        out[int(j)] = rle
    return out
