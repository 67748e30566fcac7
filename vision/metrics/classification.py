"""Classification metrics: top-1 / top-5, per-class accuracy, confusion matrix (JSON + PNG), multi-label mAP.

Top-k accuracy is timm's ``accuracy``; the confusion matrix counts rows = true class, columns =
predicted class.  Multi-label average precision follows scikit-learn's ``average_precision_score``
(sum over score thresholds of the recall step times the precision there; tied scores form one
threshold).  The plot is drawn with OpenCV, so reports need no plotting library.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] int64 counts, ``m[t, p]`` = samples of class t predicted as p."""
    labels, predicted = np.asarray(labels, np.int64), np.asarray(predicted, np.int64)
    return np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def classification_metrics(labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Single-label metrics from true indices [N] and class scores [N, K].

    ``per_class_accuracy`` is each class's recall (None for a class with no samples);
    ``mean_class_accuracy`` averages the classes that have samples.
    """
    from timm.utils import accuracy

    labels = np.asarray(labels, np.int64)
    scores = np.asarray(scores, np.float32)
    k_classes = len(class_names)
    if len(labels) == 0:
        return {"top1": float("nan"), "top5": float("nan"), "num_samples": 0}
    k = min(5, k_classes)
    top1, topk = accuracy(torch.from_numpy(scores), torch.from_numpy(labels), topk=(1, k))
    cm = confusion_matrix(labels, scores.argmax(1), k_classes)
    support = cm.sum(1)
    per_class = {
        name: (float(cm[i, i] / support[i]) if support[i] else None) for i, name in enumerate(class_names)
    }
    present = [v for v in per_class.values() if v is not None]
    return {
        "top1": float(top1) / 100.0,
        "top5": float(topk) / 100.0,
        "mean_class_accuracy": float(np.mean(present)) if present else float("nan"),
        "num_samples": len(labels),
        "per_class_accuracy": per_class,
        "per_class_support": {name: int(support[i]) for i, name in enumerate(class_names)},
        "confusion_matrix": {"classes": list(class_names), "matrix": cm.tolist()},
    }


def average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """AP of one class: sum over distinct thresholds (descending) of (R_n - R_{n-1}) * P_n."""
    targets = np.asarray(targets, bool)
    scores = np.asarray(scores, np.float64)
    positives = int(targets.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], targets[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the last index of each tied run
    tp = np.cumsum(t)[last]
    precision = tp / (last + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_metrics(targets: np.ndarray, scores: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Multi-hot targets [N, K] and scores [N, K] -> per-class AP and their mean (classes with positives)."""
    targets, scores = np.asarray(targets), np.asarray(scores)
    per_class = {name: average_precision(targets[:, i], scores[:, i]) for i, name in enumerate(class_names)}
    present = [v for v in per_class.values() if not np.isnan(v)]
    return {
        "mAP": float(np.mean(present)) if present else float("nan"),
        "num_samples": len(targets),
        "per_class_AP": {k: (None if np.isnan(v) else v) for k, v in per_class.items()},
    }


def format_report(metrics: dict[str, Any]) -> str:
    """A few lines for the console: the headline numbers and each class's accuracy (or AP)."""
    if "mAP" in metrics:
        lines = [f"mAP {metrics['mAP']:.4f} ({metrics['num_samples']} samples)"]
        lines += [f"  {name:<20} AP {ap:.4f}" for name, ap in metrics["per_class_AP"].items() if ap is not None]
        return "\n".join(lines)
    lines = [
        f"top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  mean class accuracy "
        f"{metrics['mean_class_accuracy']:.4f} ({metrics['num_samples']} samples)"
    ]
    support = metrics.get("per_class_support", {})
    for name, acc in metrics.get("per_class_accuracy", {}).items():
        shown = "-" if acc is None else f"{acc:.4f}"
        lines.append(f"  {name:<20} accuracy {shown}  ({support.get(name, 0)} samples)")
    return "\n".join(lines)


def draw_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], cell: int = 64) -> np.ndarray:
    """An RGB image of the matrix: counts in the cells, shade = share of the true class (row)."""
    m = np.asarray(matrix, np.float64)
    k = len(class_names)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.45
    label_w = max([cv2.getTextSize(str(n), font, scale, 1)[0][0] for n in class_names] + [40]) + 16
    top = label_w  # rotated column labels take the same room
    h, w = top + k * cell + 30, label_w + k * cell + 10
    img = np.full((h, w, 3), 255, np.uint8)
    rows = m.sum(1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    for i in range(k):
        for j in range(k):
            x0, y0 = label_w + j * cell, top + i * cell
            v = share[i, j]
            color = tuple(int(c) for c in (255 - 200 * v, 255 - 140 * v, 255 - 60 * v))  # white -> blue (RGB)
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), color, -1)
            cv2.rectangle(img, (x0, y0), (x0 + cell, y0 + cell), (160, 160, 160), 1)
            text = str(int(m[i, j]))
            (tw, th), _ = cv2.getTextSize(text, font, scale, 1)
            ink = (255, 255, 255) if v > 0.5 else (0, 0, 0)
            cv2.putText(img, text, (x0 + (cell - tw) // 2, y0 + (cell + th) // 2), font, scale, ink, 1, cv2.LINE_AA)
    for i, name in enumerate(class_names):
        (tw, th), _ = cv2.getTextSize(str(name), font, scale, 1)
        cv2.putText(img, str(name), (label_w - tw - 8, top + i * cell + (cell + th) // 2), font, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
        # column label, written sideways: draw on a strip and rotate it
        strip = np.full((cell, top), 255, np.uint8)
        cv2.putText(strip, str(name), (8, (cell + th) // 2), font, scale, 0, 1, cv2.LINE_AA)
        col = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
        img[:top, label_w + i * cell : label_w + (i + 1) * cell] = np.minimum(
            img[:top, label_w + i * cell : label_w + (i + 1) * cell], col[..., None]
        )
    cv2.putText(img, "rows: true class, columns: predicted", (8, h - 10), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def write_report(metrics: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``metrics.json`` and, for single-label metrics, ``confusion_matrix.json`` / ``.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json"]
    written[0].write_text(json.dumps(metrics, indent=2))
    cm = metrics.get("confusion_matrix")
    if cm:
        (out / "confusion_matrix.json").write_text(json.dumps(cm, indent=2))
        image = draw_confusion_matrix(np.asarray(cm["matrix"]), cm["classes"])
        cv2.imwrite(str(out / "confusion_matrix.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        written += [out / "confusion_matrix.json", out / "confusion_matrix.png"]
    return written
