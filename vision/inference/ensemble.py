"""Several models (each with optional TTA) predicting the same images, fused into one answer per image.

The fusion itself is ``vision.ensemble``: boxes are normalised by the image size, fused with NMS,
soft-NMS, WBF or score-sum NMS, and scaled back to pixels; masks are fused as the score-weighted mean of
the members' masks, found through the fusion's cluster membership.  The same merge serves TTA views,
so a model's views and the ensemble's models are combined the same way.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vision.data.records import Categories
from vision.ensemble import fuse, fuse_masks
from vision.errors import VisionError
from vision.inference.engine import EngineOptions
from vision.inference.tta import DEFAULT_SCALES, Prediction, TTAPredictor


@dataclass(frozen=True)
class FusionSpec:
    """How predictions are fused: a ``vision.ensemble`` method and its knobs (None = its default)."""

    method: str = "wbf"
    iou_thr: float | None = None
    skip_score: float = 0.0

    def options(self) -> dict:
        # soft-NMS as usually meant: kept boxes carry their decayed scores
        return {"decayed_scores": True} if self.method == "soft_nms" else {}


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def fuse_predictions(
    preds: Sequence[Prediction],
    size: tuple[int, int],
    spec: FusionSpec = FusionSpec(),
    weights: Sequence[float] | None = None,
) -> Prediction:
    """One image's predictions (boxes in pixels, labels 1..K, optional masks) from several sources, fused.

    ``size`` is the image's (height, width); ``weights`` one per source (None: equal).
    """
    h, w = size
    scale = np.array([w, h, w, h], dtype=np.float64)
    boxes = [_np(p["boxes"]).astype(np.float64).reshape(-1, 4) / scale for p in preds]
    scores = [_np(p["scores"]).astype(np.float64).reshape(-1) for p in preds]
    labels = [_np(p["labels"]).astype(np.int64).reshape(-1) for p in preds]
    with warnings.catch_warnings():  # boxes reaching past the border are clipped to it, as intended
        warnings.filterwarnings("ignore", "box coordinates outside")
        f = fuse(boxes, scores, labels, spec.method, weights, spec.iou_thr, spec.skip_score, **spec.options())
    out: Prediction = {
        "boxes": torch.from_numpy(np.asarray(f.boxes, dtype=np.float64).reshape(-1, 4) * scale).float(),
        "scores": torch.from_numpy(np.asarray(f.scores, dtype=np.float32).reshape(-1)),
        "labels": torch.from_numpy(np.rint(np.asarray(f.labels, dtype=np.float64)).astype(np.int64).reshape(-1)),
    }
    if any("masks" in p for p in preds):
        masks = []
        for p in preds:
            m = p.get("masks")
            if m is None:
                m = torch.zeros((len(p["scores"]), h, w))
            masks.append(_np(m[:, 0] if m.ndim == 4 else m))
        fused = fuse_masks(masks, scores, f.members, len(out["scores"]), weights)
        if fused.shape[1:] != (h, w):
            fused = np.zeros((len(out["scores"]), h, w), dtype=np.float32)
        out["masks"] = torch.from_numpy(fused)[:, None]
    return out


class EnsemblePredictor:
    """Several predictors on the same batch, their answers fused per image."""

    def __init__(self, members: Sequence, spec: FusionSpec = FusionSpec(), weights: Sequence[float] | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one model")
        if weights is not None and len(weights) != len(members):
            raise VisionError(f"{len(weights)} --model-weights given for {len(members)} models")
        self.members = list(members)
        self.spec = spec
        self.weights = None if weights is None else [float(x) for x in weights]

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def categories(self) -> Categories:
        return self.members[0].categories

    def predict(self, images: Sequence[torch.Tensor]) -> list[Prediction]:
        outs = [m.predict(images) for m in self.members]
        if len(self.members) == 1:
            return outs[0]
        return [
            fuse_predictions([o[i] for o in outs], tuple(img.shape[-2:]), self.spec, self.weights)
            for i, img in enumerate(images)
        ]


def check_same_classes(named: Sequence[tuple[str, Categories]]) -> None:
    """Every model of an ensemble must predict the same classes, in the same label order."""
    first_name, first = named[0]
    for name, cats in named[1:]:
        if cats.names != first.names:
            raise VisionError(
                f"{first_name} and {name} have different class names "
                f"({', '.join(first.names)} vs {', '.join(cats.names)}); an ensemble needs the same classes"
            )
        if cats.ids != first.ids:
            raise VisionError(
                f"{first_name} and {name} give their classes different category ids "
                f"({list(first.ids)} vs {list(cats.ids)}); an ensemble needs the same ids"
            )


def build_predictor(
    weights: Sequence[str | os.PathLike], *, config: str | os.PathLike | None = None, overrides: Sequence[str] = (),
    **options: Any,
):
    """The predictor ``vision predict`` runs: one model, or several fused, each with optional TTA
    (``options`` are ``predictor_of``'s)."""
    from vision.inference.loading import load_for_inference

    return predictor_of([load_for_inference(w, config, overrides) for w in weights], **options)


def predictor_of(
    loaded: Sequence[Any],
    *,
    device: str | torch.device = "auto",
    amp: bool = False,
    tta: bool = False,
    tta_scales: Sequence[float] = DEFAULT_SCALES,
    spec: FusionSpec = FusionSpec(),
    model_weights: Sequence[float] | None = None,
    engine: EngineOptions | None = None,
    whole_batches: bool = False,
):
    """One predictor over already loaded models (``LoadedModel``): each with optional TTA, fused when several.

    The loaded models are handed over: each becomes its predictor's inference model (batch norms folded
    in place), so a large model is not held twice; load again to train or export one."""
    from vision.inference.predictor import Predictor
    from vision.runtime.device import select_device

    if model_weights is not None and len(model_weights) != len(loaded):
        raise VisionError(f"{len(model_weights)} --model-weights given for {len(loaded)} --weights")
    dev = device if isinstance(device, torch.device) else select_device(device)
    members, named = [], []
    for m in loaded:
        named.append((m.source, m.categories))
        check_same_classes(named)
        p = Predictor(m.model, m.categories, device=dev, amp=amp, engine=engine, whole_batches=whole_batches,
                      copy_model=False)
        if tta:
            p = TTAPredictor(p, lambda preds, size: fuse_predictions(preds, size, spec), scales=tta_scales)
        members.append(p)
    return members[0] if len(members) == 1 and not tta else EnsemblePredictor(members, spec, model_weights)
