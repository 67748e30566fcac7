"""Model outputs as COCO results: boxes ``[x, y, w, h]``, the data set's own category ids, masks as RLE.

Prediction keeps RLEs rather than mask arrays: hundreds of full-size masks per image would otherwise hold
gigabytes until evaluation or until they are written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from vision.data.records import Categories

__all__ = ["masks_to_rles", "prediction_to_results"]




def masks_to_rles(masks: Any, threshold: float = 0.5) -> list[dict[str, Any]]:
    """[N, H, W] (or torchvision's [N, 1, H, W]) probabilities or booleans -> COCO RLEs, in one call.

    Prediction keeps RLEs rather than mask arrays: hundreds of full-size masks per image would
    otherwise hold gigabytes until evaluation.
    """
    from pycocotools import mask as mask_utils

    masks = _numpy(masks)
    if masks.ndim == 4:
        masks = masks[:, 0]
    if masks.dtype != bool:
        masks = masks >= threshold
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def prediction_to_results(
    image_id: int, prediction: Mapping[str, Any], categories: Categories, mask_threshold: float = 0.5
) -> list[dict[str, Any]]:
    """One image's prediction (boxes xyxy px, scores, labels 1..K, optional masks) -> COCO results."""
    boxes = np.asarray(_numpy(prediction["boxes"]), np.float64).reshape(-1, 4)
    scores = np.asarray(_numpy(prediction["scores"]), np.float64).reshape(-1)
    labels = np.asarray(_numpy(prediction["labels"]), np.int64).reshape(-1)
    rles = prediction.get("rles")
    if rles is None and prediction.get("masks") is not None:
        rles = masks_to_rles(prediction["masks"], mask_threshold)
    out = []
    for k in range(len(scores)):
        x1, y1, x2, y2 = boxes[k]
        r: dict[str, Any] = {
            "image_id": image_id,
            "category_id": categories.id_of(int(labels[k])),
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "score": float(scores[k]),
        }
        if rles is not None:
            r["segmentation"] = rles[k]
        out.append(r)
    return out


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)
