"""``DetectionSet`` -> torch ``Dataset`` of ``(image, target)`` pairs as torchvision's detectors take them.

Crowd regions are left out of training targets (the detectors have no notion of them; COCO evaluation
still sees them through the data set's ground truth), as are VOC ``difficult`` objects when asked.
An image that cannot be decoded is reported once and another image is served in its place, so one bad
file never stops an epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vision.data.coco import segmentation_to_mask
from vision.data.image_io import read_image
from vision.data.records import DetectionSet, ImageRecord
from vision.errors import ImageReadError

log = logging.getLogger(__name__)

Sample = dict[str, Any]


def record_masks(record: ImageRecord) -> np.ndarray:
    """[N, H, W] uint8 instance masks; instances without a segmentation get their box filled."""
    masks = np.zeros((len(record), record.height, record.width), np.uint8)
    for k in range(len(record)):
        seg = record.segmentations[k] if record.segmentations is not None else None
        if seg is not None:
            masks[k] = segmentation_to_mask(seg, record.height, record.width)
        else:
            x1, y1, x2, y2 = np.round(record.boxes[k]).astype(int)
            masks[k, y1:y2, x1:x2] = 1
    return masks


class DetectionDataset(Dataset):
    """Reads, transforms and tensorises one image per item."""

    def __init__(
        self,
        det_set: DetectionSet,
        transform: Callable[[Sample], Sample] | None = None,
        with_masks: bool = False,
        skip_difficult: bool = False,
    ):
        self.det_set = det_set
        self.transform = transform
        self.with_masks = with_masks
        self.skip_difficult = skip_difficult
        self.unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.det_set.records)

    def load_sample(self, index: int) -> Sample:
        """The raw sample: HxWx3 uint8 image, xyxy boxes, labels 1..K and optional [N,H,W] masks."""
        record = self.det_set.records[index]
        keep = ~record.iscrowd
        if self.skip_difficult:
            keep &= ~record.difficult
        record = record.select(keep)
        image = read_image(record.path)
        h, w = image.shape[:2]
        if (w, h) != (record.width, record.height):
            raise ImageReadError(
                record.path, f"image is {w}x{h} but the annotations say {record.width}x{record.height}"
            )
        sample: Sample = {
            "image": image,
            "boxes": record.boxes.copy(),
            "labels": record.labels.copy(),
            "image_id": record.image_id,
        }
        if self.with_masks:
            sample["masks"] = record_masks(record)
        return sample

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        _, sample = load_first_readable(index, len(self), self.load_sample, self.unreadable, self.det_set.source)
        if self.transform is not None:
            sample = self.transform(sample)
        return to_tensors(sample)


def load_first_readable(
    index: int, size: int, load: Callable[[int], Any], unreadable: set[int], source: str
) -> tuple[int, Any]:
    """``load(index)``, or of the next index whose image decodes; each bad one is named once and remembered.

    One bad file must not stop an epoch: its place is taken by the next readable sample.
    """
    for attempt in range(size):
        i = (index + attempt) % size
        if i in unreadable:
            continue
        try:
            return i, load(i)
        except ImageReadError as e:
            unreadable.add(i)
            log.warning("skipping unreadable image: %s", e)
    raise ImageReadError(source, "no readable image in the data set")


def to_tensors(sample: Sample) -> tuple[torch.Tensor, dict[str, Any]]:
    """uint8 HWC -> float CHW in [0, 1]; torchvision's detectors normalise and resize themselves."""
    image = torch.from_numpy(np.ascontiguousarray(sample["image"])).permute(2, 0, 1).float().div_(255.0)
    target: dict[str, Any] = {
        "boxes": torch.as_tensor(np.asarray(sample["boxes"], np.float32).reshape(-1, 4)),
        "labels": torch.as_tensor(np.asarray(sample["labels"], np.int64)),
        "image_id": int(sample.get("image_id", -1)),
    }
    if "masks" in sample:
        target["masks"] = torch.from_numpy(np.ascontiguousarray(sample["masks"], dtype=np.uint8))
    return image, target


def collate_detection(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Detectors take lists (images differ in size), so a batch stays two lists."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
