"""The one record type every annotation format is read into.

Readers (COCO JSON, Pascal VOC XML, YOLO txt) differ in how they spell a box; once read, a data set
is a ``Categories`` object plus a list of ``ImageRecord``.  Labels inside a record are contiguous
(1..K, 0 is background, as torchvision's detectors expect); the data set's own category ids travel in
``Categories`` so that results go back out with the ids the user's files use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Categories:
    """Category ids as the data set numbers them, and their names, in label order (label = index + 1)."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.names):
            raise ValueError("Categories needs one name per id")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"duplicate category ids in {self.ids}")

    @classmethod
    def from_names(cls, names: Iterable[str]) -> Categories:
        names = tuple(names)
        return cls(tuple(range(1, len(names) + 1)), names)

    @classmethod
    def from_coco(cls, categories: Sequence[dict[str, Any]]) -> Categories:
        cats = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(int(c["id"]) for c in cats), tuple(str(c.get("name", c["id"])) for c in cats))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_classes(self) -> int:
        """Classes including background, as torchvision's ``num_classes``."""
        return len(self.ids) + 1

    def has_id(self, cat_id: int) -> bool:
        return cat_id in self._label_by_id

    def label_of(self, cat_id: int) -> int:
        return self._label_by_id[cat_id]

    def id_of(self, label: int) -> int:
        return self.ids[label - 1]

    def name_of(self, label: int) -> str:
        return self.names[label - 1]

    def label_of_name(self, name: str) -> int:
        return self.names.index(name) + 1

    @property
    def _label_by_id(self) -> dict[int, int]:
        cache = self.__dict__.get("_cache")
        if cache is None:
            cache = {c: i + 1 for i, c in enumerate(self.ids)}
            object.__setattr__(self, "_cache", cache)
        return cache

    def to_coco(self) -> list[dict[str, Any]]:
        return [{"id": i, "name": n, "supercategory": ""} for i, n in zip(self.ids, self.names)]


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), np.float32)


def _empty_labels() -> np.ndarray:
    return np.zeros((0,), np.int64)


def _empty_flags() -> np.ndarray:
    return np.zeros((0,), bool)


@dataclass
class ImageRecord:
    """One image and its instances.

    ``boxes`` are float32 xyxy pixels, clipped to the image; ``labels`` are contiguous (1..K);
    ``segmentations`` holds each instance's COCO segmentation (polygon list or RLE dict) or None.
    ``path`` is where the pixels are; ``file_name`` is how the annotation file names them.
    """

    image_id: int
    file_name: str
    path: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=_empty_boxes)
    labels: np.ndarray = field(default_factory=_empty_labels)
    iscrowd: np.ndarray = field(default_factory=_empty_flags)
    difficult: np.ndarray = field(default_factory=_empty_flags)
    segmentations: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: np.ndarray) -> ImageRecord:
        """The same image with only the instances where ``keep`` is true."""
        keep = np.asarray(keep, bool)
        segs = None if self.segmentations is None else [s for s, k in zip(self.segmentations, keep) if k]
        return ImageRecord(
            self.image_id, self.file_name, self.path, self.width, self.height,
            self.boxes[keep], self.labels[keep], self.iscrowd[keep], self.difficult[keep], segs,
        )


@dataclass
class DetectionSet:
    """A data set: its categories and its images.  ``source`` names the annotation file or folder."""

    categories: Categories
    records: list[ImageRecord]
    source: str = ""
    dropped: list[str] = field(default_factory=list)  # zero-area boxes removed while reading, described
    skipped_images: list[str] = field(default_factory=list)  # unreadable images, by path

    def __len__(self) -> int:
        return len(self.records)

    def labels_per_image(self) -> list[np.ndarray]:
        """Each image's instance labels (crowd regions excluded): what samplers balance on."""
        return [r.labels[~r.iscrowd] for r in self.records]
