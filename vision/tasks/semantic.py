"""Semantic segmentation: class-index maps, scored by mIoU from summed confusion matrices.

Prediction keeps one small confusion matrix per validation image instead of its class map, so
evaluation memory does not grow with image sizes, and matrices from several processes simply add up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from vision.data.records import Categories
from vision.inference.dataset import predict_shards
from vision.inference.result import Result, semantic_result
from vision.tasks.base import DETECTION_ONLY_OPTIONS, Task, TrainingData, WriterOptions


class SemanticTask(Task):
    """Semantic FPN; ``best.pt`` follows mIoU."""

    name = "semantic segmentation"
    metric = "mIoU"
    refused_options: ClassVar[dict[str, Any]] = {**DETECTION_ONLY_OPTIONS, "csv": False}

    def _prepare(self, data_set: Any) -> None:
        data_set.ignore_index = self.cfg.model.ignore_index
        data_set.crowd_ignore = self.cfg.data.crowd_ignore

    def training_data(self) -> TrainingData:
        from vision.data.semantic import (
            SemanticDataset,
            build_semantic_eval_transform,
            build_semantic_sets,
            build_semantic_train_transform,
        )

        cfg = self.cfg
        train_set, val_set = build_semantic_sets(cfg)
        self.fill_num_classes(train_set.categories)
        return TrainingData(
            train_set, SemanticDataset(train_set, build_semantic_train_transform(cfg.data.augment)),
            val_set, SemanticDataset(val_set, build_semantic_eval_transform()),
        )

    def validation_data(self, categories: Categories | None) -> tuple[Any, Dataset]:
        from vision.data.semantic import (
            SemanticDataset,
            build_semantic_eval_transform,
            read_semantic_split,
            validate_set,
        )

        d = self.cfg.data
        split = d.val if d.val.ann else d.train
        names = list(categories.names) if categories is not None else d.class_names
        val_set = read_semantic_split(split, d.root, names)
        self.check_classes(categories, val_set)
        self._prepare(val_set)
        validate_set(val_set)
        return val_set, SemanticDataset(val_set, build_semantic_eval_transform())

    def collate(self, batch: list) -> Any:
        from vision.data.dataset import collate_detection

        return collate_detection(batch)

    def predict_dataset(self, model: nn.Module, dataset: Dataset, data_set: Any, device: torch.device,
                        **kwargs: Any) -> dict[Any, Any]:
        return predict_confusions(model, dataset, data_set, device, **kwargs)

    def evaluate(self, data_set: Any, predictions: dict[Any, Any]) -> dict[str, Any]:
        return evaluate_confusions(data_set, predictions)

    def score(self, metrics: dict[str, Any] | None) -> float:
        return miou(metrics)

    def headline(self, metrics: dict[str, Any]) -> str:
        return f"mIoU {metrics['mIoU']:.4f}  pixel accuracy {metrics['pixel_accuracy']:.4f}"

    def writer(self, out_dir: Path, categories: Categories, options: WriterOptions):
        from vision.inference.writers import Drawing, SemanticWriter

        drawing = Drawing(Path(out_dir) / "images") if options.save_images else None
        return SemanticWriter(Path(out_dir), categories, drawing=drawing)

    def result(self, pred: dict[str, torch.Tensor], categories: Categories, path: str | None,
               shape: tuple[int, int], image: np.ndarray | None) -> Result:
        return semantic_result(pred, categories, path, shape, image)


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
