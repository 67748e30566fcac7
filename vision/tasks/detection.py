"""Detection and instance segmentation: COCO-style data sets, box (and mask) AP with pycocotools."""

from __future__ import annotations

from vision.config import Config
from vision.errors import ConfigError
from vision.tasks import Task


def build_detection_task(cfg: Config) -> Task:
    from vision.data.build import build_datasets
    from vision.data.dataset import DetectionDataset, collate_detection
    from vision.data.transforms import build_eval_transform, build_train_transform
    from vision.engine.trainer import box_ap, default_evaluator, predict_dataset

    train_set, val_set = build_datasets(cfg)
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = len(train_set.categories)
    elif cfg.model.num_classes < len(train_set.categories):
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but the training set has "
            f"{len(train_set.categories)} classes"
        )
    d = cfg.data
    with_masks = d.with_masks or cfg.model.arch == "mask_rcnn"
    return Task(
        train_set=train_set,
        train_dataset=DetectionDataset(train_set, build_train_transform(d.augment), with_masks, d.skip_difficult),
        val_set=val_set,
        val_dataset=DetectionDataset(val_set, build_eval_transform(), with_masks, d.skip_difficult),
        collate=collate_detection,
        predict=predict_dataset,
        evaluate=default_evaluator(with_masks, cfg.model.detections_per_img),
        score=box_ap,
        score_name="box AP",
    )
