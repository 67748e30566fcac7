"""``vision eval``: a checkpoint scored on its config's validation split by its own task.

Only the validation split is read (the training split when there is none).  The model runs through
the inference engine, as ``vision predict`` and the training-time evaluation run it, so the numbers
are the ones those give.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vision.atomic import atomic_write
from vision.tasks.base import Task


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    task: Task
    num_images: int
    metrics_file: Path
    plots: list[Path] = field(default_factory=list)


def evaluate_checkpoint(
    weights: str | os.PathLike,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    out: str | os.PathLike | None = None,
    batch_size: int | None = None,
    plots: bool = True,
) -> Evaluation:
    """Scores ``weights``; writes ``metrics.json`` (default: beside the weights) and the plots."""
    from vision.inference.loading import categories_from_checkpoint, resolve_config
    from vision.metrics.coco import keep_coco_evals
    from vision.models import build_model
    from vision.models.weights import load_checkpoint, load_model_weights
    from vision.runtime.device import select_device
    from vision.runtime.precision import mixed_precision_usable
    from vision.tasks import task_for

    ckpt = load_checkpoint(weights)  # read once: {"model": state_dict[, "config", "categories", ...]}
    cfg = resolve_config(weights, ckpt, config, overrides,
                         "is a plain state_dict with no config inside: give the CONFIG it was trained with")
    categories = categories_from_checkpoint(ckpt) if ckpt.get("class_names") or ckpt.get("categories") else None
    task = task_for(cfg)
    val_set, dataset = task.validation_data(categories)
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = len(val_set.categories)
    cfg.model.pretrained = None  # the weights below replace any backbone initialisation
    cfg.model.init_from = None
    device = select_device(cfg.train.device)
    model = build_model(cfg.model)
    load_model_weights(model, ckpt, source=str(weights))
    model.to(device).eval()
    preds = task.predict_dataset(
        model, dataset, val_set, device, batch_size=batch_size or cfg.data.batch_size,
        num_workers=cfg.data.num_workers, amp=mixed_precision_usable(device, cfg.train.amp),
    )
    with keep_coco_evals() as coco_evals:  # pycocotools' accumulated evaluation, for the PR curves
        metrics = task.evaluate(val_set, preds)
    out_file = Path(out) if out else Path(weights).parent / "metrics.json"
    record = {k: v for k, v in metrics.items() if k != "summary"}
    record.update({"weights": str(weights), "num_images": len(val_set), "source": val_set.source})
    with atomic_write(out_file, "w") as f:
        f.write(json.dumps(record, indent=2))
    drawn = task.report_plots(metrics, val_set, preds, out_file.parent, coco_evals) if plots else []
    return Evaluation(metrics, task, len(val_set), out_file, drawn)
