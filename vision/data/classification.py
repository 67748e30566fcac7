"""Classification data: image folders, label CSVs and crops of detection boxes -> one sample list.

Three layouts are read into a ``ClassificationSet`` (a ``Categories`` object and ``ClassSample`` s):

- ``folder``: ``ROOT/<class name>/<image>`` (torchvision's ``ImageFolder`` layout and its file scan);
- ``csv``: one ``path,label[,label...]`` row per image (an optional ``path,label`` header; several
  labels make a multi-label sample), paths relative to the split's ``images`` folder;
- any detection format (``coco``, ``voc``, ``yolo``): every box becomes a crop with a context margin,
  so a detection data set doubles as a classification one (BCCD's cells).

Labels are 0-based class indices (the detection sets' labels minus one).  Transforms are timm's
``create_transform`` (RandomResizedCrop, flips, AutoAugment / RandAugment by policy string, colour
jitter) with an identity normalisation: the model normalises by its backbone's statistics itself.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from vision.config import Config, SplitConfig, resolve_path
from vision.data.dataset import load_first_readable
from vision.data.image_io import read_image, read_image_header
from vision.data.records import Categories, DetectionSet
from vision.errors import ConfigError, DataError, ImageReadError

log = logging.getLogger(__name__)

DETECTION_FORMATS = ("coco", "voc", "yolo")
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ClassSample:
    """One image (or one crop of it, ``box`` xyxy in pixels) and its class indices."""

    path: str
    labels: tuple[int, ...]
    box: Box | None = None


@dataclass
class ClassificationSet:
    """Categories (class index i is ``categories.names[i]``) and samples; ``source`` names the origin."""

    categories: Categories
    samples: list[ClassSample]
    source: str = ""
    skipped_images: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def multi_label(self) -> bool:
        return any(len(s.labels) != 1 for s in self.samples)

    def labels_per_image(self) -> list[np.ndarray]:
        """Each sample's classes: what the class-balanced sampler draws on."""
        return [np.asarray(s.labels, np.int64) for s in self.samples]

    def targets(self, multi_hot: bool | None = None) -> np.ndarray:
        """[N] class indices, or [N, K] multi-hot rows (``multi_hot``; default: when samples have several)."""
        if not (self.multi_label if multi_hot is None else multi_hot):
            return np.array([s.labels[0] for s in self.samples], np.int64)
        out = np.zeros((len(self.samples), len(self.categories)), np.float32)
        for i, s in enumerate(self.samples):
            out[i, list(s.labels)] = 1.0
        return out


# readers ---------------------------------------------------------------------------------------------


def read_image_folder(folder: str | Path, class_names: Sequence[str] | None = None) -> ClassificationSet:
    """``folder/<class>/<image>``; classes sorted by name unless ``class_names`` gives the order."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(str(folder), "image folder not found")
    if class_names is None:
        try:
            class_names, _ = find_classes(str(folder))
        except FileNotFoundError:
            raise DataError(str(folder), "no class sub-folders (expected FOLDER/<class>/<image>)") from None
    class_to_idx = {name: i for i, name in enumerate(class_names)}
    extensions = tuple(sorted(set(IMG_EXTENSIONS) | {".tif", ".tiff"}))
    found = make_dataset(str(folder), class_to_idx, extensions=extensions, allow_empty=True)
    samples = [ClassSample(str(path), (int(label),)) for path, label in found]
    if not samples:
        raise DataError(str(folder), f"no images in the class sub-folders {list(class_names)}")
    return ClassificationSet(Categories.from_names(class_names), samples, str(folder))


def read_label_csv(
    path: str | Path, images: str | Path | None = None, class_names: Sequence[str] | None = None
) -> ClassificationSet:
    """Rows ``path,label[,label...]``; class names sorted from the file unless ``class_names`` is given."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [[c.strip() for c in row] for row in csv.reader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(str(path), f"cannot read the label file ({getattr(e, 'strerror', None) or e})") from None
    rows = [r for r in rows if r and any(r)]
    if rows and rows[0][0].lower() in ("path", "file", "filename", "file_name", "image"):
        rows = rows[1:]
    base = Path(images) if images else path.parent
    parsed: list[tuple[str, list[str]]] = []
    for line, row in enumerate(rows, 1):
        labels = [c for c in row[1:] if c]
        if not labels:
            raise DataError(str(path), f"row {line} ({row[0]!r}) has no label (expected path,label[,label...])")
        parsed.append((row[0], labels))
    if not parsed:
        raise DataError(str(path), "no rows (expected path,label[,label...])")
    names = list(class_names) if class_names else sorted({lab for _, labels in parsed for lab in labels})
    index = {n: i for i, n in enumerate(names)}
    samples = []
    for file, labels in parsed:
        unknown = [lab for lab in labels if lab not in index]
        if unknown:
            raise DataError(str(path), f"{file}: label {unknown[0]!r} is not one of the classes {names}")
        p = Path(file)
        samples.append(ClassSample(str(p if p.is_absolute() else base / p), tuple(index[lab] for lab in labels)))
    return ClassificationSet(Categories.from_names(names), samples, str(path))


def _span(lo: float, hi: float, min_len: float, limit: int) -> tuple[int, int]:
    """[lo, hi) widened about its centre to ``min_len`` (shifted back inside [0, limit) where it fits),
    then clipped and taken outward to whole pixels."""
    if hi - lo < min_len:
        centre = (lo + hi) / 2
        lo, hi = centre - min_len / 2, centre + min_len / 2
        if lo < 0:
            lo, hi = 0.0, hi - lo
        if hi > limit:
            lo, hi = lo - (hi - limit), float(limit)
    a, b = max(0, math.floor(lo)), min(limit, math.ceil(hi))
    return int(a), int(max(b, a + 1))


def crop_box(box: Sequence[float], width: int, height: int, margin: float, min_size: int = 0) -> Box:
    """The crop around ``box`` (xyxy): widened by ``margin`` of its width / height on every side, then to
    at least ``min_size`` pixels a side about its centre, clipped to the image, outward to whole pixels.

    ``min_size`` keeps small objects small: without it every crop fills the network's input, and a
    platelet looks as large as a white cell.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    mw, mh = margin * (x2 - x1), margin * (y2 - y1)
    cx1, cx2 = _span(x1 - mw, x2 + mw, min_size, width)
    cy1, cy2 = _span(y1 - mh, y2 + mh, min_size, height)
    return cx1, cy1, cx2, cy2


def crops_from_detections(
    det_set: DetectionSet, margin: float = 0.1, skip_difficult: bool = False, min_size: int = 0
) -> ClassificationSet:
    """Every (non-crowd) box of a detection set as a labelled crop."""
    if margin < 0:
        raise ConfigError(f"data.crop_margin must be >= 0, got {margin}")
    samples = []
    for r in det_set.records:
        keep = ~r.iscrowd
        if skip_difficult:
            keep &= ~r.difficult
        for box, label in zip(r.boxes[keep], r.labels[keep]):
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            samples.append(ClassSample(r.path, (int(label) - 1,), crop_box(box, r.width, r.height, margin, min_size)))
    return ClassificationSet(det_set.categories, samples, det_set.source, list(det_set.skipped_images))


def read_classification_split(
    split: SplitConfig, root: str = "", class_names: Sequence[str] | None = None, margin: float = 0.1,
    skip_difficult: bool = False, min_size: int = 0,
) -> ClassificationSet:
    """One split, by its ``format``: ``folder``, ``csv`` or a detection format (crops of its boxes)."""
    if split.format == "folder":
        folder = resolve_path(root, split.images or split.ann)
        if not folder:
            raise ConfigError("a folder split needs 'images' (the folder holding one sub-folder per class)")
        return read_image_folder(folder, class_names)
    if split.format == "csv":
        ann = resolve_path(root, split.ann)
        if not ann:
            raise ConfigError("a csv split needs 'ann' (the path,label[,label...] file)")
        return read_label_csv(ann, resolve_path(root, split.images), class_names)
    if split.format in DETECTION_FORMATS:
        from vision.data.build import read_split

        det_set = read_split(split, root, list(class_names) if class_names else None)
        return crops_from_detections(det_set, margin, skip_difficult, min_size)
    raise ConfigError(
        f"unknown data format '{split.format}' for classification (folder, csv, {', '.join(DETECTION_FORMATS)})"
    )


def drop_unreadable_samples(cls_set: ClassificationSet) -> ClassificationSet:
    """Removes the samples whose image file cannot be read (headers and end markers only, checked once
    per job and cached beside the set's source: ``vision.data.image_check``), naming each file once."""
    from vision.data.image_check import check_images_once_per_job

    bad = check_images_once_per_job(sorted({s.path for s in cls_set.samples}), cls_set.source or None)
    for error in bad.values():
        log.warning("skipping unreadable image: %s", error)
    if bad:
        cls_set.samples = [s for s in cls_set.samples if s.path not in bad]
        cls_set.skipped_images.extend(bad.values())
    return cls_set


def build_classification_sets(cfg: Config, check_images: bool = True) -> tuple[ClassificationSet, ClassificationSet]:
    """Train and val sets of a config; val takes train's class names, so indices agree."""
    d = cfg.data
    crop = dict(margin=d.crop_margin, skip_difficult=d.skip_difficult, min_size=d.crop_min_size)
    train = read_classification_split(d.train, d.root, d.class_names, **crop)
    names = list(train.categories.names)
    has_val = bool(d.val.ann or (d.val.format == "folder" and d.val.images))
    val = read_classification_split(d.val, d.root, names, **crop) if has_val else train
    if list(val.categories.names) != names:
        raise ConfigError(f"train and val class names differ: {names} vs {list(val.categories.names)}")
    if check_images:
        for s in {id(train): train, id(val): val}.values():
            drop_unreadable_samples(s)
    if not cfg.model.multi_label:
        for s in (train, val):
            if s.multi_label:
                raise DataError(s.source, "samples with several labels need model.multi_label=true")
    return train, val


# transforms and the torch data set -------------------------------------------------------------------


def build_cls_transform(cfg: Config, training: bool) -> Callable[[Image.Image], torch.Tensor]:
    """timm's ImageNet-style transform at ``model.image_size``; output float CHW in [0, 1]."""
    from timm.data import create_transform

    a, size = cfg.data.augment, cfg.model.image_size
    identity = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    if not training:
        return create_transform(size, is_training=False, crop_pct=cfg.data.crop_pct, interpolation="bilinear",
                                **identity)
    policy = a.autoaugment
    if policy is not None and not isinstance(policy, str):
        raise ConfigError("data.augment.autoaugment for a classifier is a timm policy string, e.g. original or "
                          "rand-m9-mstd0.5")
    return create_transform(
        size, is_training=True, scale=tuple(a.scale), hflip=a.hflip, vflip=a.vflip,
        color_jitter=a.color_jitter, auto_augment=policy or None, interpolation="bilinear", **identity,
    )


class ClassificationDataset(Dataset):
    """``(image float CHW in [0, 1], {"label": ..., "image_id": index})`` per sample.

    ``label`` is an int64 scalar, or a float multi-hot vector when ``multi_label``.  A sample whose
    image cannot be decoded is reported once and the next readable one is served instead.
    """

    def __init__(self, cls_set: ClassificationSet, transform: Callable | None = None, multi_label: bool = False):
        self.cls_set = cls_set
        self.transform = transform
        self.multi_label = multi_label
        self.unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.cls_set.samples)

    def load(self, index: int) -> np.ndarray:
        """The sample's pixels (the crop, for a box sample) as HxWx3 uint8 RGB."""
        s = self.cls_set.samples[index]
        image = read_image(s.path)
        if s.box is not None:
            x1, y1, x2, y2 = s.box
            image = image[y1:y2, x1:x2]
            if image.size == 0:
                raise ImageReadError(s.path, f"crop {s.box} lies outside the {image.shape[1]}x{image.shape[0]} image")
        return image

    def target(self, index: int) -> dict[str, Any]:
        labels = self.cls_set.samples[index].labels
        if self.multi_label:
            label = torch.zeros(len(self.cls_set.categories))
            label[list(labels)] = 1.0
        else:
            label = torch.tensor(labels[0], dtype=torch.int64)
        return {"label": label, "image_id": index}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        i, image = load_first_readable(index, len(self), self.load, self.unreadable, self.cls_set.source)
        if self.transform is None:
            tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        else:
            tensor = self.transform(Image.fromarray(image))
        return tensor, self.target(i)


def collate_classification(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Two lists, as for the detectors: the classifier stacks (and if needed resizes) them itself."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
