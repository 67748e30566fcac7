"""Classification: image folders, label CSVs or detection-box crops; top-1 (or multi-label mAP) for best.pt."""

from __future__ import annotations

import functools

from vision.config import Config
from vision.errors import ConfigError
from vision.tasks import Task


def build_classification_task(cfg: Config) -> Task:
    from vision.data.classification import (
        ClassificationDataset,
        build_classification_sets,
        build_cls_transform,
        collate_classification,
    )
    from vision.inference.cls_predict import (
        classification_score,
        evaluate_predictions,
        predict_classification_dataset,
    )

    train_set, val_set = build_classification_sets(cfg)
    n = len(train_set.categories)
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = n
    elif cfg.model.num_classes != n:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} but the training set has {n} classes")
    multi = cfg.model.multi_label
    return Task(
        train_set=train_set,
        train_dataset=ClassificationDataset(train_set, build_cls_transform(cfg, training=True), multi),
        val_set=val_set,
        val_dataset=ClassificationDataset(val_set, build_cls_transform(cfg, training=False), multi),
        collate=collate_classification,
        predict=predict_classification_dataset,
        evaluate=functools.partial(evaluate_predictions, multi_label=multi),
        score=classification_score,
        score_name="mAP" if multi else "top-1",
    )
