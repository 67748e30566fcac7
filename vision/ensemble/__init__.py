"""Fusion of several models' detections and class-hierarchy expansion.

Works on detections alone (boxes, scores, labels, masks), so it serves results files as well as live
models.  ``nms``, ``soft_nms``, ``nms_method`` and ``weighted_boxes_fusion`` are a drop-in for
ensemble-boxes (same signatures, defaults and outputs); ``fuse`` / ``fuse_batch`` add score-sum NMS and
cluster membership (for ``fuse_masks``); ``fuse_results`` fuses whole COCO results files; the
hierarchy functions expand detections and ground truth to parent classes.
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
from vision.ensemble.hierarchy import (
    Hierarchy,
    expand_coco_ground_truth,
    expand_detections,
    extend_categories,
    load_hierarchy,
)
from vision.ensemble.masks import fuse_masks
from vision.ensemble.results import fuse_results, load_images, load_results

__all__ = [
    "METHODS",
    "Fusion",
    "Hierarchy",
    "expand_coco_ground_truth",
    "expand_detections",
    "extend_categories",
    "fuse",
    "fuse_batch",
    "fuse_masks",
    "fuse_results",
    "load_hierarchy",
    "load_images",
    "load_results",
    "nms",
    "nms_method",
    "score_sum_nms",
    "soft_nms",
    "weighted_boxes_fusion",
]
