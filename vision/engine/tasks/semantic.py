"""Semantic segmentation: class-index maps, scored by mIoU from summed confusion matrices.

Prediction keeps one small confusion matrix per validation image instead of its class map, so
evaluation memory does not grow with image sizes, and matrices from several processes simply add up.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from vision.config import Config
from vision.engine.tasks import Task
from vision.errors import ConfigError


def class_names_with_background(categories: Any) -> list[str]:
    return ["background", *categories.names]


@torch.inference_mode()
def predict_confusions(
    model: nn.Module,
    dataset: Dataset,
    data_set: Any,
    device: torch.device,
    *,
    batch_size: int = 2,
    num_workers: int = 0,
    amp: bool = False,
    show_progress: bool = True,
) -> dict[int, np.ndarray]:
    """This rank's share of ``dataset`` -> ``{item index: confusion matrix}``, gathered on every rank."""
    from vision.data.dataset import collate_detection
    from vision.engine import distributed as du
    from vision.engine.device import autocast, to_device
    from vision.engine.logging import progress
    from vision.engine.semantic_eval import confusion_matrix
    from vision.engine.trainer import make_loader

    info = du.dist_info()
    indices = list(range(info.rank, len(dataset), info.world_size))  # type: ignore[arg-type]
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    loader = make_loader(dataset, batches, num_workers, device, 0, collate_detection, persistent=False)
    num_classes = data_set.num_classes
    was_training = model.training
    model.eval()
    out: dict[int, np.ndarray] = {}
    bar = progress(len(batches), 0, "eval", show_progress and info.is_main)
    try:
        for b, (images, targets) in enumerate(loader):
            images, _ = to_device(images, None, device)
            with autocast(device, amp):
                preds = model(images)
            for k, (tgt, pred) in enumerate(zip(targets, preds)):
                out[batches[b][k]] = confusion_matrix(
                    pred["sem_seg"], tgt["sem_seg"].to(pred["sem_seg"].device), num_classes, data_set.ignore_index
                )
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    if info.enabled:
        merged: dict[int, np.ndarray] = {}
        for part in du.all_gather_object(out):
            merged.update(part)
        out = merged
    return out


def evaluate_confusions(data_set: Any, predictions: dict[int, np.ndarray]) -> dict[str, Any]:
    from vision.engine.semantic_eval import metrics_from_confusion, sum_confusions

    cm = sum_confusions(predictions.values(), data_set.num_classes)
    return metrics_from_confusion(cm, class_names_with_background(data_set.categories))


def miou(metrics: dict[str, Any] | None) -> float:
    if not metrics:
        return float("nan")
    return float(metrics.get("mIoU", float("nan")))


def build_semantic_task(cfg: Config) -> Task:
    from vision.data.dataset import collate_detection
    from vision.data.semantic import (
        SemanticDataset,
        build_semantic_eval_transform,
        build_semantic_sets,
        build_semantic_train_transform,
    )

    train_set, val_set = build_semantic_sets(cfg)
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = len(train_set.categories)
    elif cfg.model.num_classes < len(train_set.categories):
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but the training set has {len(train_set.categories)} classes"
        )
    return Task(
        train_set=train_set,
        train_dataset=SemanticDataset(train_set, build_semantic_train_transform(cfg.data.augment)),
        val_set=val_set,
        val_dataset=SemanticDataset(val_set, build_semantic_eval_transform()),
        collate=collate_detection,
        predict=predict_confusions,
        evaluate=evaluate_confusions,
        score=miou,
        score_name="mIoU",
    )
