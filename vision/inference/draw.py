"""Predictions drawn on their image (torchvision's drawing utilities), for a person to look at."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from vision.data.records import Categories

# The score a detection needs to be drawn (``vision predict --save-images``, ``Result.draw``), not to be
# kept: as detectron2's demo, 0.5.  Below it a focal-loss detector's second guesses (the same object under
# another class, at 0.3-0.4) crowd the picture; the results files keep every detection.
DRAW_THRESH = 0.5

# Labels as black text on a band of the box's colour, readable on any background; torchvision draws them
# so from 0.23 on (``fill_labels``), older releases in the box's colour only.
_LABEL_STYLE = {"fill_labels": True} if "fill_labels" in inspect.signature(draw_bounding_boxes).parameters else {}

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


def draw_prediction(
    image: np.ndarray, prediction: dict[str, torch.Tensor], categories: Categories, score_thresh: float | None = None
) -> np.ndarray:
    """HxWx3 uint8 RGB with boxes labelled ``name score`` (and masks blended in, when there are any);
    ``score_thresh`` None draws those scoring ``DRAW_THRESH`` or more."""
    keep = prediction["scores"] >= (DRAW_THRESH if score_thresh is None else score_thresh)
    boxes, labels, scores = prediction["boxes"][keep], prediction["labels"][keep], prediction["scores"][keep]
    colors = [_PALETTE[(int(lab) - 1) % len(_PALETTE)] for lab in labels]
    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    masks = prediction.get("masks")
    if masks is not None and keep.any():
        m = masks[keep]
        m = (m[:, 0] if m.ndim == 4 else m) >= 0.5
        canvas = draw_segmentation_masks(canvas, m, alpha=0.45, colors=colors)
    if len(boxes):
        text = [f"{categories.name_of(int(lab))} {float(s):.2f}" for lab, s in zip(labels, scores)]
        width = max(1, round(max(image.shape[:2]) / 400))
        canvas = draw_bounding_boxes(canvas, boxes, labels=text, colors=colors, width=width, **_LABEL_STYLE)
    return canvas.permute(1, 2, 0).numpy()


def save_drawing(image: np.ndarray, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def draw_caption(image: np.ndarray, text: str) -> np.ndarray:
    """The image with ``text`` on a white band along its top (a classifier's answer)."""
    out = np.ascontiguousarray(image).copy()
    scale = max(0.4, min(out.shape[:2]) / 500)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    out[: th + base + 8, : min(out.shape[1], tw + 10)] = 255
    cv2.putText(out, text, (5, th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return out
