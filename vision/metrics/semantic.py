"""Semantic segmentation metrics from a confusion matrix: mIoU, per-class IoU, pixel accuracy.

A confusion matrix per image is all an evaluation has to keep (a few numbers however large the image),
and matrices add up, across images and across processes.  Rows are ground truth, columns predictions;
pixels whose ground truth is the ignore index count nowhere.  A class that appears neither in the
ground truth nor in the predictions has no IoU and is left out of the mean (as mmsegmentation does).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch


def confusion_matrix(
    pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """[num_classes, num_classes] int64 counts: ``cm[t, p]`` = pixels of true class t predicted as p."""
    p = torch.as_tensor(pred).reshape(-1).long()
    t = torch.as_tensor(target).reshape(-1).long().to(p.device)
    if p.shape != t.shape:
        raise ValueError(f"prediction has {p.numel()} pixels, target {t.numel()}")
    keep = (t != ignore_index) & (t >= 0) & (t < num_classes)
    idx = t[keep] * num_classes + p[keep].clamp(0, num_classes - 1)
    cm = torch.bincount(idx, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def metrics_from_confusion(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """``{"mIoU", "pixel_accuracy", "mean_accuracy", "per_class_iou": {name: IoU or NaN}}``.

    ``class_names`` names every row of ``cm``, background first.
    """
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    gt = cm.sum(1)
    pred = cm.sum(0)
    union = gt + pred - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    total = cm.sum()
    return {
        "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_accuracy": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
        "per_class_iou": {str(n): float(v) for n, v in zip(class_names, iou)},
    }


def sum_confusions(matrices: Iterable[np.ndarray], num_classes: int) -> np.ndarray:
    total = np.zeros((num_classes, num_classes), np.int64)
    for m in matrices:
        total += m
    return total

