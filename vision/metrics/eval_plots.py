"""The pictures ``vision eval`` writes beside ``metrics.json``, chosen by what the evaluation produced.

Detection: precision-recall curves from pycocotools' own accumulated evaluation and a confusion
matrix with a background class; classification: the confusion matrix the metrics already hold;
semantic segmentation: per-class IoU bars.  One call, so the command stays a caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_eval_plots(
    metrics: Mapping[str, Any],
    val_set: Any,
    predictions: Mapping[Any, Any],
    out_dir: str | Path,
    coco_evals: Mapping[str, Any] | None = None,
    *,
    iou: float = 0.5,
    score_thresh: float = 0.25,
) -> list[Path]:
    """Writes the evaluation's PNGs into ``out_dir``; returns their paths (none for metrics it cannot draw).

    ``coco_evals`` is what ``coco_eval.keep_coco_evals`` collected during the evaluation.
    """
    from vision.metrics import plots

    out = Path(out_dir)
    written: list[Path] = []
    coco_evals = coco_evals or {}
    for iou_type, ev in coco_evals.items():
        name = "pr_curves.png" if iou_type == "bbox" else f"pr_curves_{iou_type}.png"
        written.append(plots.plot_pr_curves(ev, out / name, title=f"{iou_type}: {getattr(val_set, 'source', '')}"))
    if "bbox" in metrics and hasattr(val_set, "records"):
        from vision.data.coco import to_coco_dict
        from vision.metrics.coco import prediction_to_results

        gt = to_coco_dict(val_set)
        dets = [
            r for image_id, pred in predictions.items()
            for r in prediction_to_results(image_id, {k: v for k, v in pred.items() if k in ("boxes", "scores", "labels")},
                                           val_set.categories)
        ]
        matrix = plots.detection_confusion_matrix(gt, dets, iou=iou, score_thresh=score_thresh)
        written.append(plots.plot_confusion_matrix(
            matrix, val_set.categories.names, out / "confusion_matrix.png",
            title=f"detections (score >= {score_thresh:g}, IoU >= {iou:g}), rows normalised",
        ))
    cm = metrics.get("confusion_matrix")
    if isinstance(cm, Mapping) and "matrix" in cm:
        written.append(plots.plot_confusion_matrix(cm["matrix"], cm["classes"], out / "confusion_matrix.png"))
    if isinstance(metrics.get("per_class_iou"), Mapping):
        miou = metrics.get("mIoU")
        title = f"per-class IoU (mIoU {miou:.3f})" if isinstance(miou, float) else ""
        written.append(plots.plot_class_iou(metrics["per_class_iou"], out / "class_iou.png", title=title))
    return written
