"""Classification: image folders, label CSVs or detection-box crops; top-1 (or multi-label mAP) for best.pt."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from vision.config import Config
from vision.data.records import Categories
from vision.inference.dataset import predict_shards
from vision.inference.result import Result, classification_result
from vision.tasks.base import DETECTION_ONLY_OPTIONS, Task, TrainingData, WriterOptions


class ClassificationTask(Task):
    """timm backbone + SE + global average pooling; ``best.pt`` follows top-1 (mAP when multi-label)."""

    name = "classification"
    whole_batches = True  # every input has the model's size after the eval transform
    refused_options: ClassVar[dict[str, Any]] = {**DETECTION_ONLY_OPTIONS, "save_images": False}

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.multi_label = cfg.model.multi_label

    @property
    def metric(self) -> str:  # type: ignore[override]
        return "mAP" if self.multi_label else "top-1"

    def _dataset(self, data_set: Any, training: bool) -> Dataset:
        from vision.data.classification import ClassificationDataset, build_cls_transform

        return ClassificationDataset(data_set, build_cls_transform(self.cfg, training=training), self.multi_label)

    def training_data(self) -> TrainingData:
        from vision.data.classification import build_classification_sets

        cfg = self.cfg
        train_set, val_set = build_classification_sets(cfg)
        self.fill_num_classes(train_set.categories, exact=True)
        return TrainingData(train_set, self._dataset(train_set, True), val_set, self._dataset(val_set, False))

    def validation_data(self, categories: Categories | None) -> tuple[Any, Dataset]:
        from vision.data.classification import drop_unreadable_samples, read_classification_split

        d = self.cfg.data
        has_val = bool(d.val.ann or (d.val.format == "folder" and d.val.images))
        split = d.val if has_val else d.train
        names = list(categories.names) if categories is not None else d.class_names
        val_set = read_classification_split(split, d.root, names, margin=d.crop_margin,
                                            skip_difficult=d.skip_difficult, min_size=d.crop_min_size)
        self.check_classes(categories, val_set)
        drop_unreadable_samples(val_set)
        return val_set, self._dataset(val_set, False)

    def collate(self, batch: list) -> Any:
        from vision.data.classification import collate_classification

        return collate_classification(batch)

    def predict_dataset(self, model: nn.Module, dataset: Dataset, data_set: Any, device: torch.device,
                        **kwargs: Any) -> dict[Any, Any]:
        kwargs["batch_size"] = max(int(kwargs.get("batch_size") or 0), 32)
        return predict_classification_dataset(model, dataset, data_set, device, **kwargs)

    def evaluate(self, data_set: Any, predictions: dict[Any, Any]) -> dict[str, Any]:
        return evaluate_predictions(data_set, predictions, self.multi_label)

    def score(self, metrics: dict[str, Any] | None) -> float:
        return classification_score(metrics)

    def headline(self, metrics: dict[str, Any]) -> str:
        if "mAP" in metrics:
            return f"mAP {metrics['mAP']:.4f}"
        return "  ".join(f"{k} {metrics[k]:.4f}" for k in ("top1", "top5") if k in metrics)

    def preprocess(self) -> Callable[[np.ndarray], torch.Tensor] | None:
        from PIL import Image

        from vision.data.classification import build_cls_transform

        transform = build_cls_transform(self.cfg, training=False)
        return lambda rgb: transform(Image.fromarray(rgb))

    def writer(self, out_dir: Path, categories: Categories, options: WriterOptions):
        from vision.inference.writers import ClassificationWriter

        return ClassificationWriter(categories)

    def result(self, pred: dict[str, torch.Tensor], categories: Categories, path: str | None,
               shape: tuple[int, int], image: np.ndarray | None) -> Result:
        return classification_result(pred, categories, path, shape, image)


def predict_classification_dataset(
    model: nn.Module,
    dataset: Dataset,
    data_set: Any,
    device: torch.device,
    *,
    batch_size: int = 32,
    **kwargs: Any,
) -> dict[int, dict[str, torch.Tensor]]:
    """Sample index -> ``{"scores": [K]}`` for this rank's share, gathered on every rank."""
    from vision.data.classification import collate_classification

    def keep(images: list, targets: list, outputs: list, _: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        return {int(t["image_id"]): {"scores": o["scores"].detach().float().cpu()} for t, o in zip(targets, outputs)}

    return predict_shards(model, dataset, device, collate_classification, keep, batch_size=batch_size, **kwargs)


def evaluate_predictions(
    data_set: Any, predictions: dict[int, dict[str, torch.Tensor]], multi_label: bool | None = None
) -> dict[str, Any]:
    """Metrics of a ``ClassificationSet`` against predictions keyed by sample index: top-k accuracy, or
    mAP when ``multi_label`` (default: when the data set's samples have several labels)."""
    from vision.metrics.classification import classification_metrics, multilabel_metrics

    names = list(data_set.categories.names)
    keep = sorted(i for i in predictions if 0 <= i < len(data_set))
    scores = np.stack([predictions[i]["scores"].numpy() for i in keep]) if keep else np.zeros((0, len(names)))
    all_targets = data_set.targets(multi_label)
    targets = all_targets[keep] if keep else all_targets[:0]
    if targets.ndim == 2:
        return multilabel_metrics(targets, scores, names)
    return classification_metrics(targets, scores, names)


def classification_score(metrics: dict[str, Any] | None) -> float:
    """What ``best.pt`` follows: top-1 accuracy, or mAP for multi-label."""
    if not metrics:
        return float("nan")
    return float(metrics.get("mAP", metrics.get("top1", float("nan"))))
