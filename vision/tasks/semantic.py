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
from vision.errors import ConfigError
from vision.tasks import Task


def class_names_with_background(categories: Any) -> list[str]:
    return ["background", *categories.names]


def predict_confusions(
    model: nn.Module,
    dataset: Dataset,
    data_set: Any,
    device: torch.device,
    **kwargs: Any,
) -> dict[int, np.ndarray]:
    """This rank's share of ``dataset`` -> ``{item index: confusion matrix}``, gathered on every rank.

    One small matrix per image rather than its class map, so memory does not grow with image size.
    """
    from vision.data.dataset import collate_detection
    from vision.engine.trainer import predict_shards
    from vision.metrics.semantic import confusion_matrix

    def keep(images: list, targets: list, outputs: list, indices: list[int]) -> dict[int, np.ndarray]:
        return {
            index: confusion_matrix(
                pred["sem_seg"], tgt["sem_seg"].to(pred["sem_seg"].device), data_set.num_classes, data_set.ignore_index
            )
            for index, tgt, pred in zip(indices, targets, outputs)
        }

    return predict_shards(model, dataset, device, collate_detection, keep, **kwargs)


def evaluate_confusions(data_set: Any, predictions: dict[int, np.ndarray]) -> dict[str, Any]:
    from vision.metrics.semantic import metrics_from_confusion, sum_confusions

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
