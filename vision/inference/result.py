"""One image's prediction as the Python API returns it: plain numpy arrays and the names to read them by.

Every task fills the fields it has and leaves the others ``None``:

- detection: ``boxes`` [N, 4] xyxy in the image's pixels, ``scores`` [N], ``labels`` [N] (the data set's
  own category ids, as in its annotation files), ``names`` [N], and for Mask R-CNN ``masks`` [N, H, W]
  booleans;
- semantic segmentation: ``mask`` [H, W] class indices (0 background, k the k-th class of ``classes``);
- classification: ``probs`` [K] and ``top_k`` (``(name, probability)`` pairs, best first).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vision.data.records import Categories


@dataclass
class Result:
    task: str
    path: str | None
    shape: tuple[int, int]  # (height, width) of the image as read
    classes: list[str]  # every class the model knows, in label order
    image: np.ndarray | None = field(default=None, repr=False)  # the RGB image, for draw()
    boxes: np.ndarray | None = None
    scores: np.ndarray | None = None
    labels: np.ndarray | None = None
    names: list[str] | None = None
    masks: np.ndarray | None = field(default=None, repr=False)
    mask: np.ndarray | None = field(default=None, repr=False)
    probs: np.ndarray | None = None
    top_k: list[tuple[str, float]] | None = None
    _categories: Categories | None = field(default=None, repr=False)
    _prediction: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        """Detections in the image (classification and semantic results count 1)."""
        return len(self.scores) if self.boxes is not None and self.scores is not None else 1

    def to_coco(self, image_id: int = 0) -> list[dict[str, Any]]:
        """COCO result dicts (``bbox`` as [x, y, w, h]; RLE ``segmentation`` for masks)."""
        if self.task != "detection" or self._prediction is None or self._categories is None:
            raise ValueError(f"to_coco() is for detections; this is a {self.task} result")
        from vision.data.coco_results import prediction_to_results

        return prediction_to_results(image_id, self._prediction, self._categories)

    def draw(self, score_thresh: float | None = None) -> np.ndarray:
        """The image with the prediction drawn on it (HxWx3 uint8 RGB), as ``vision predict --save-images``."""
        if self.image is None:
            raise ValueError("draw() needs the image: predict with keep_images=True (the default)")
        if self.task == "detection":
            from vision.inference.draw import draw_prediction

            return draw_prediction(self.image, self._prediction, self._categories, score_thresh)
        if self.task == "semantic segmentation":
            from vision.inference.writers import overlay

            return overlay(self.image, self.mask, len(self.classes) + 1)
        from vision.inference.draw import draw_caption

        return draw_caption(self.image, ", ".join(f"{n} {p:.2f}" for n, p in (self.top_k or [])[:3]))


def detection_result(
    pred: dict[str, torch.Tensor], categories: Categories, path: str | None, shape: tuple[int, int],
    image: np.ndarray | None,
) -> Result:
    labels = pred["labels"].numpy()
    masks = pred.get("masks")
    if masks is not None:
        masks = (masks[:, 0] if masks.ndim == 4 else masks).numpy() >= 0.5
    return Result(
        task="detection", path=path, shape=shape, classes=list(categories.names), image=image,
        boxes=pred["boxes"].numpy().astype(np.float32), scores=pred["scores"].numpy().astype(np.float32),
        labels=np.array([categories.id_of(int(k)) for k in labels], dtype=np.int64),
        names=[categories.name_of(int(k)) for k in labels], masks=masks, _categories=categories, _prediction=pred,
    )


def semantic_result(
    pred: dict[str, torch.Tensor], categories: Categories, path: str | None, shape: tuple[int, int],
    image: np.ndarray | None,
) -> Result:
    return Result(task="semantic segmentation", path=path, shape=shape, classes=list(categories.names), image=image,
                  mask=pred["sem_seg"].numpy())


def classification_result(
    pred: dict[str, torch.Tensor], categories: Categories, path: str | None, shape: tuple[int, int],
    image: np.ndarray | None,
) -> Result:
    probs = pred["scores"].float().numpy()
    top = [(categories.names[int(i)], float(probs[int(i)])) for i in pred["labels"].tolist()]
    return Result(task="classification", path=path, shape=shape, classes=list(categories.names), image=image,
                  probs=probs, top_k=top, names=[top[0][0]] if top else [])
