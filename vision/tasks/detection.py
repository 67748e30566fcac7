"""Detection and instance segmentation: COCO-style data sets, box (and mask) AP with pycocotools."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from vision.config import Config
from vision.data.records import Categories, DetectionSet
from vision.inference.dataset import predict_shards
from vision.inference.result import Result, detection_result
from vision.tasks.base import Task, TrainingData, WriterOptions

Evaluator = Callable[[DetectionSet, dict[int, dict[str, Any]]], dict[str, Any]]


class DetectionTask(Task):
    """RetinaNet, Faster R-CNN and Mask R-CNN; ``best.pt`` follows box AP."""

    name = "detection"
    metric = "box AP"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.with_masks = cfg.data.with_masks or cfg.model.arch == "mask_rcnn"

    def _dataset(self, det_set: DetectionSet, training: bool) -> Dataset:
        from vision.data.dataset import DetectionDataset
        from vision.data.transforms import build_eval_transform, build_train_transform

        d = self.cfg.data
        transform = build_train_transform(d.augment) if training else build_eval_transform()
        return DetectionDataset(det_set, transform, self.with_masks, d.skip_difficult)

    def training_data(self) -> TrainingData:
        from vision.data.build import build_datasets

        cfg = self.cfg
        train_set, val_set = build_datasets(cfg)
        self.fill_num_classes(train_set.categories)
        return TrainingData(train_set, self._dataset(train_set, True), val_set, self._dataset(val_set, False))

    def validation_data(self, categories: Categories | None) -> tuple[DetectionSet, Dataset]:
        from vision.data.build import drop_unreadable_images, read_split

        d = self.cfg.data
        split = d.val if d.val.ann else d.train
        names = list(categories.names) if categories is not None else d.class_names
        val_set = drop_unreadable_images(read_split(split, d.root, names))
        self.check_classes(categories, val_set)
        return val_set, self._dataset(val_set, False)

    def collate(self, batch: list) -> Any:
        from vision.data.dataset import collate_detection

        return collate_detection(batch)

    def predict_dataset(self, model: nn.Module, dataset: Dataset, data_set: Any, device: torch.device,
                        **kwargs: Any) -> dict[Any, Any]:
        return predict_dataset(model, dataset, data_set, device, **kwargs)

    def evaluate(self, data_set: Any, predictions: dict[Any, Any]) -> dict[str, Any]:
        return default_evaluator(self.with_masks, self.cfg.model.detections_per_img)(data_set, predictions)

    def score(self, metrics: dict[str, Any] | None) -> float:
        return box_ap(metrics)

    def headline(self, metrics: dict[str, Any]) -> str:
        m = metrics["bbox"]
        text = f"box AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}"
        if "segm" in metrics:
            text += f"  mask AP {metrics['segm']['AP']:.4f}  AP50 {metrics['segm']['AP50']:.4f}"
        return text

    def writer(self, out_dir: Path, categories: Categories, options: WriterOptions):
        from vision.inference.writers import DetectionWriter, Drawing

        drawing = Drawing(Path(out_dir) / "images", options.draw_thresh) if options.save_images else None
        return DetectionWriter(categories, expand=options.expand, categories_out=options.categories_out,
                               write_csv=options.write_csv, drawing=drawing)

    def result(self, pred: dict[str, torch.Tensor], categories: Categories, path: str | None,
               shape: tuple[int, int], image: np.ndarray | None) -> Result:
        return detection_result(pred, categories, path, shape, image)


def default_evaluator(with_masks: bool, max_dets: int | None = None) -> Evaluator:
    """COCO box (and mask) AP; ``max_dets`` above 100 raises COCO's detections-per-image limit."""
    from vision.metrics.coco import evaluate_detections

    iou_types = ("bbox", "segm") if with_masks else ("bbox",)
    limit = max_dets if max_dets is not None and max_dets > 100 else None

    def evaluate(det_set: DetectionSet, predictions: dict[int, dict[str, Any]]) -> dict[str, Any]:
        return evaluate_detections(det_set, predictions, iou_types, max_dets=limit)

    return evaluate


def _to_original_size(pred: dict[str, torch.Tensor], image: torch.Tensor, width: int, height: int) -> dict:
    """Predictions on the (possibly resized) input image -> the record's own pixel grid.

    Masks leave as COCO RLEs (``rles``): a few hundred full-size probability maps per image, kept
    for a whole validation set, would not fit in memory.
    """
    from vision.data.coco_results import masks_to_rles

    out = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in pred.items()}
    h, w = image.shape[-2:]
    if (w, h) != (width, height):
        sx, sy = width / w, height / h
        out["boxes"] = out["boxes"] * torch.tensor([sx, sy, sx, sy])
        if "masks" in out and len(out["masks"]):
            out["masks"] = nn.functional.interpolate(out["masks"], size=(height, width), mode="bilinear")
    if "masks" in out:
        out["rles"] = masks_to_rles(out.pop("masks"))
    return out


def predict_dataset(
    model: nn.Module,
    dataset: Dataset,
    det_set: DetectionSet,
    device: torch.device,
    **kwargs: Any,
) -> dict[int, dict[str, torch.Tensor]]:
    """Detections keyed by image id, in each record's own pixels (masks as RLE), from every rank."""
    from vision.data.dataset import collate_detection

    sizes = {r.image_id: (r.width, r.height) for r in det_set.records}

    def keep(images: list, targets: list, outputs: list, _: list[int]) -> dict[int, dict[str, Any]]:
        out = {}
        for img, tgt, pred in zip(images, targets, outputs):
            image_id = int(tgt["image_id"])
            w, h = sizes.get(image_id, (img.shape[-1], img.shape[-2]))
            out[image_id] = _to_original_size(pred, img, w, h)
        return out

    return predict_shards(model, dataset, device, collate_detection, keep, split_batches=True, **kwargs)


def box_ap(metrics: dict[str, Any] | None) -> float:
    """Box AP (0 when nothing was detected, see ``metrics.coco``)."""
    if not metrics:
        return float("nan")
    return float(metrics.get("bbox", {}).get("AP", float("nan")))
