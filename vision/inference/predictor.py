"""One model, batched inference on decoded images, predictions in original-image pixels.

``engine`` says how the model is run (``engine.py``): by default batch norms folded, ``channels_last``
and, on a CPU, one image per forward pass (a padded batch only adds memory traffic there), float32.
A task whose model takes a whole batch of equal-size inputs (a classifier) asks for ``whole_batches``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from vision.data.records import Categories
from vision.inference.engine import EngineOptions, aspect_groups, optimize_for_inference
from vision.runtime.device import select_device
from vision.runtime.precision import amp_precision, precision_context, precision_dtype


class Predictor:
    """One model run by the engine (see the module docstring).

    ``amp`` is the older switch for reduced precision (bfloat16 on CPU, float16 on CUDA);
    ``engine.precision`` wins where both are given.  ``EngineOptions.plain()`` runs the model exactly
    as trained.  ``copy_model=False`` hands the model over: the engine rewrites it in place (folded
    batch norms) instead of keeping a second copy of its weights.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        categories: Categories,
        device: str | torch.device = "auto",
        amp: bool = False,
        engine: EngineOptions | None = None,
        whole_batches: bool = False,
        copy_model: bool = True,
    ):
        self.device = device if isinstance(device, torch.device) else select_device(device)
        engine = EngineOptions() if engine is None else engine
        if amp and engine.precision == "fp32":
            engine = replace(engine, precision=amp_precision(self.device, True))
        precision_dtype(engine.precision, self.device)  # an unsupported precision fails here, not mid-run
        self.engine = engine
        self.model = optimize_for_inference(model.to(self.device), engine, copy_model=copy_model)
        self.categories = categories
        self.whole_batches = whole_batches

    @torch.inference_mode()
    def predict(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """CHW tensors (uint8 pixels, or a task's preprocessed floats) -> the model's predictions on the CPU
        (boxes, scores, labels[, masks] for detectors)."""
        outputs: list[dict[str, torch.Tensor] | None] = [None] * len(images)
        per_pass = len(images) if self.whole_batches else self.engine.images_per_pass(self.device)
        for group in aspect_groups(images, max(1, per_pass)):
            batch = [_model_input(images[i].to(self.device, non_blocking=True)) for i in group]
            with precision_context(self.engine.precision, self.device):
                preds = self.model(batch)
            for i, o in zip(group, preds):
                outputs[i] = _drop_background(
                    {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()}
                )
        return outputs  # type: ignore[return-value]


def _drop_background(pred: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RetinaNet scores label 0 like any class; 0 is background in our labels, so it is never an answer."""
    if "boxes" not in pred:  # not a detector's output (a classifier's labels are its top-k classes)
        return pred
    keep = pred["labels"] > 0
    if bool(keep.all()):
        return pred
    return {k: v[keep] if v.ndim and len(v) == len(keep) else v for k, v in pred.items()}


def _model_input(image: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] as the models take them; a preprocessed float input passes as it is."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image


def hierarchy_expander(hierarchy: Any, categories: Categories, merge: str | None = "nms") -> tuple[Any, list[dict]]:
    """Per-image parent-class expansion for a detection writer, and the categories it writes (ancestors added)."""
    from vision.ensemble import expand_detections, extend_categories

    base = categories.to_coco()
    cats, _ = extend_categories(base, hierarchy)

    def expand(results: list[dict[str, Any]], image: dict[str, Any]) -> list[dict[str, Any]]:
        sizes = {image["id"]: (image["width"], image["height"])}
        expanded, _ = expand_detections(results, hierarchy, base, sizes, merge=merge)
        return expanded

    return expand, cats


