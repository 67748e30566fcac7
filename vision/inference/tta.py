"""Test-time augmentation: predict on flipped and rescaled copies, map back, merge.

A detector is not flip- or scale-invariant, so predicting the same image a few ways and fusing the
answers finds objects a single pass misses and steadies the boxes it finds.  Each view's predictions
are mapped back to the original image (boxes un-flipped and un-scaled, masks likewise) before the
merge, which is any of the ensemble fusion methods, so TTA and multi-model ensembling share one code
path.

Scaling a torchvision detector's input does nothing on its own: its ``GeneralizedRCNNTransform``
resizes every input to ``min_size`` anyway.  For such models a scale changes the transform's
``min_size`` / ``max_size`` for that pass (predictions already come back in input pixels); any other
model gets a resized input and its predictions are scaled back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

Prediction = dict[str, torch.Tensor]
# Merges one image's predictions from several views into one; the size is (height, width).
Merge = Callable[[Sequence[Prediction], tuple[int, int]], Prediction]

DEFAULT_SCALES = (0.8, 1.0, 1.2)


def flip_prediction(pred: Prediction, width: int) -> Prediction:
    """A prediction made on the horizontally flipped image, in the original image's pixels."""
    out = dict(pred)
    b = pred["boxes"]
    out["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
    if "masks" in pred:
        out["masks"] = pred["masks"].flip(-1)
    return out


def rescale_prediction(pred: Prediction, from_size: tuple[int, int], to_size: tuple[int, int]) -> Prediction:
    """A prediction made on an image of ``from_size`` (h, w), mapped to ``to_size``."""
    (fh, fw), (th, tw) = from_size, to_size
    if (fh, fw) == (th, tw):
        return pred
    out = dict(pred)
    scale = torch.tensor([tw / fw, th / fh, tw / fw, th / fh], dtype=pred["boxes"].dtype)
    out["boxes"] = pred["boxes"] * scale
    if "masks" in pred:
        m = pred["masks"]
        m4 = m if m.ndim == 4 else m[:, None]
        m4 = F.interpolate(m4.float(), size=(th, tw), mode="bilinear", align_corners=False) if len(m4) else (
            m4.new_zeros((0, m4.shape[1], th, tw), dtype=torch.float32))
        out["masks"] = m4 if m.ndim == 4 else m4[:, 0]
    return out


def _transform_of(model: torch.nn.Module):
    t = getattr(model, "transform", None)
    return t if t is not None and hasattr(t, "min_size") and hasattr(t, "max_size") else None


@contextlib.contextmanager
def scaled_model(model: torch.nn.Module, scale: float) -> Iterator[bool]:
    """Within the block the model sees images ``scale`` times larger; yields whether inputs must be resized.

    For a torchvision detector the transform's sizes are changed (and restored afterwards), so the
    caller passes the original image; for other models the caller resizes the input itself.
    """
    t = _transform_of(model)
    if t is None or scale == 1.0:
        yield t is None and scale != 1.0
        return
    min_size, max_size = t.min_size, t.max_size
    t.min_size = tuple(max(1, round(s * scale)) for s in min_size)
    t.max_size = max(1, round(max_size * scale))
    try:
        yield False
    finally:
        t.min_size, t.max_size = min_size, max_size


def resize_image(image: torch.Tensor, scale: float) -> torch.Tensor:
    """uint8 CHW image resized by ``scale`` (bilinear, antialiased when shrinking)."""
    h, w = image.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


class TTAPredictor:
    """Wraps a predictor: every image is predicted once per (scale, flip) view and the views merged."""

    def __init__(
        self, predictor, merge: Merge, flip: bool = True, scales: Sequence[float] = DEFAULT_SCALES
    ):
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"TTA scales must be positive, got {list(scales)}")
        self.predictor = predictor
        self.merge = merge
        self.flips = (False, True) if flip else (False,)
        self.scales = tuple(float(s) for s in scales)

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def categories(self):
        return self.predictor.categories

    def views(self, images: Sequence[torch.Tensor]) -> list[list[Prediction]]:
        """Per view, per image: the predictions mapped back to the original image."""
        out: list[list[Prediction]] = []
        sizes = [tuple(img.shape[-2:]) for img in images]
        for scale in self.scales:
            with scaled_model(self.predictor.model, scale) as resize_input:
                inputs = [resize_image(img, scale) for img in images] if resize_input else list(images)
                for flip in self.flips:
                    batch = [img.flip(-1) for img in inputs] if flip else inputs
                    preds = self.predictor.predict(batch)
                    mapped = []
                    for img, pred, size in zip(batch, preds, sizes):
                        if flip:
                            pred = flip_prediction(pred, img.shape[-1])
                        mapped.append(rescale_prediction(pred, tuple(img.shape[-2:]), size))
                    out.append(mapped)
        return out

    def predict(self, images: Sequence[torch.Tensor]) -> list[Prediction]:
        per_view = self.views(images)
        return [
            self.merge([v[i] for v in per_view], tuple(img.shape[-2:])) for i, img in enumerate(images)
        ]
