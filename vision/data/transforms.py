"""Training and evaluation transforms on ``{image, boxes, labels[, masks]}`` samples.

albumentations does the pixel and box work (``BboxParams`` keeps boxes and masks in step); the
detection AutoAugment policies, which albumentations lacks, run first on the raw sample.  When masks
are present, boxes are re-derived from the transformed masks: a rotated box's corners overshoot the
object, its mask does not.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A

from vision.config import AugmentConfig

Sample = dict[str, Any]


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes (pixel edges) of [N, H, W] masks; empty masks give zero boxes."""
    n = len(masks)
    boxes = np.zeros((n, 4), np.float32)
    if n == 0:
        return boxes
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    for k in range(n):
        ys, xs = np.flatnonzero(rows[k]), np.flatnonzero(cols[k])
        if len(xs) and len(ys):
            boxes[k] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def augment_ops(cfg: AugmentConfig, crop: A.BasicTransform | None = None) -> list[A.BasicTransform]:
    """The albumentations operations an ``AugmentConfig`` asks for, in order.

    ``crop`` is the operation used when ``cfg.crop > 0`` (default: a crop that keeps every box);
    segmentation passes a plain border crop instead.
    """
    ops: list[A.BasicTransform] = []
    lo, hi = cfg.scale
    if (lo, hi) != (1.0, 1.0):
        ops.append(A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), p=1.0))
    if cfg.crop > 0:
        ops.append(crop if crop is not None else A.BBoxSafeRandomCrop(erosion_rate=0.0, p=cfg.crop))
    if cfg.hflip > 0:
        ops.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        ops.append(A.VerticalFlip(p=cfg.vflip))
    if cfg.rotate90 > 0:
        ops.append(A.RandomRotate90(p=cfg.rotate90))
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        ops.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(j / 4, 0.1), p=0.8))
    return ops


class DetectionTransform:
    """Applies an optional AutoAugment policy, then an albumentations pipeline, keeping instances aligned."""

    def __init__(self, ops: list[A.BasicTransform], autoaugment: Callable[[Sample], Sample] | None = None):
        self.autoaugment = autoaugment
        self.pipeline = (
            A.Compose(
                ops,
                bbox_params=A.BboxParams(
                    format="pascal_voc", label_fields=["labels", "instance_ids"], min_area=1.0, clip=True
                ),
            )
            if ops
            else None
        )

    def __call__(self, sample: Sample) -> Sample:
        if self.autoaugment is not None:
            sample = self.autoaugment(sample)
        if self.pipeline is None:
            return sample
        masks = sample.get("masks")
        ids = np.arange(len(sample["labels"]))
        kwargs: dict[str, Any] = {
            "image": sample["image"],
            "bboxes": np.asarray(sample["boxes"], np.float32).reshape(-1, 4),
            "labels": np.asarray(sample["labels"]),
            "instance_ids": ids,
        }
        if masks is not None and len(masks):
            kwargs["masks"] = masks
        out = self.pipeline(**kwargs)
        kept = np.asarray(out["instance_ids"], np.int64)
        result = dict(sample)
        result["image"] = out["image"]
        result["boxes"] = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        result["labels"] = np.asarray(sample["labels"])[kept]
        if masks is not None:
            h, w = out["image"].shape[:2]
            new_masks = np.asarray(out["masks"], np.uint8) if len(masks) else np.zeros((0, h, w), np.uint8)
            result["masks"] = new_masks[kept] if len(masks) else new_masks
            result = tighten_to_masks(result)
        return result


def tighten_to_masks(sample: Sample) -> Sample:
    """Boxes become the tight boxes of their masks; instances whose mask vanished are dropped."""
    masks = sample["masks"]
    boxes = masks_to_boxes(masks)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = dict(sample)
    out["boxes"], out["labels"], out["masks"] = boxes[keep], np.asarray(sample["labels"])[keep], masks[keep]
    return out


def build_train_transform(cfg: AugmentConfig) -> DetectionTransform:
    autoaugment = None
    if cfg.autoaugment:
        from vision.data.autoaugment import DetectionAutoAugment

        autoaugment = DetectionAutoAugment(cfg.autoaugment, reference_size=cfg.autoaugment_reference_size)
    return DetectionTransform(augment_ops(cfg), autoaugment)


def build_eval_transform() -> DetectionTransform:
    """Evaluation leaves pixels alone: the model's own transform resizes and normalises."""
    return DetectionTransform([])
