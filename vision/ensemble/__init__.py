"""Fusion of several models' detections and class-hierarchy expansion.

Works on detections alone (boxes, scores, labels, masks), so it serves results files as well as live
models.  The box-level functions are a drop-in for ensemble-boxes (same signatures and outputs).
"""

from vision.ensemble.fusion import (
    METHODS,
    Fusion,
    fuse,
    fuse_batch,
    nms,
    nms_method,
    score_sum_nms,
    soft_nms,
    weighted_boxes_fusion,
)

__all__ = [
    "METHODS",
    "Fusion",
    "fuse",
    "fuse_batch",
    "nms",
    "nms_method",
    "score_sum_nms",
    "soft_nms",
    "weighted_boxes_fusion",
]
