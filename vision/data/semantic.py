"""Semantic segmentation data: images with a class-index map each.

Three sources, one record type (``SemanticSet`` of ``SemanticItem``):

- a folder pair: ``images/<name>.<ext>`` and ``masks/<name>.png``, matched by relative path and stem
  (``ids``: an optional file of stems restricting the split);
- a list file of ``image_path mask_path`` lines (relative paths from the list file's folder);
- COCO instances, rasterised by category when an item is loaded (crowd regions become the ignore
  index when asked, so a model is neither taught nor scored on them).

Class 0 is background; classes 1..K are the names in ``Categories`` (COCO categories in id order, or
``data.class_names``); pixels equal to the ignore index (255) are left out of losses and metrics.
Masks are checked when a set is built (single channel, the image's size, labels in range), so bad
files stop a run before training starts, each with its path and what is wrong with it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from vision.config import AugmentConfig, Config, SplitConfig, resolve_path
from vision.data.coco import read_coco, segmentation_to_mask
from vision.data.dataset import load_first_readable
from vision.data.image_io import IMAGE_SUFFIXES, read_image, read_image_size, read_image_unchanged
from vision.data.records import Categories, ImageRecord
from vision.data.transforms import augment_ops
from vision.errors import ConfigError, DataError, ImageReadError

log = logging.getLogger(__name__)

SEMANTIC_FORMATS = ("masks", "mask_list", "coco")


@dataclass
class SemanticItem:
    """One image; its class map is a PNG (``mask_path``) or rasterised from COCO instances (``record``)."""

    image_id: int
    path: str
    mask_path: str | None = None
    record: ImageRecord | None = None
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # labels present, 1..K


@dataclass
class SemanticSet:
    """Categories (foreground classes, label = index + 1) and items; ``source`` names the split's origin."""

    categories: Categories
    items: list[SemanticItem]
    source: str = ""
    ignore_index: int = 255
    crowd_ignore: bool = True
    skipped_images: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_classes(self) -> int:
        """Classes including background."""
        return len(self.categories) + 1

    def labels_per_image(self) -> list[np.ndarray]:
        """The foreground classes in each image: what class-balanced samplers draw on."""
        return [item.classes for item in self.items]


# reading ----------------------------------------------------------------------------------------------


def _read_mask_file(path: str) -> np.ndarray:
    if not Path(path).is_file():
        raise DataError(path, "mask file not found")
    try:
        mask = read_image_unchanged(path)
    except ImageReadError as e:  # a bad mask stops the run: it is a DataError, not an image to skip
        raise DataError(path, f"not a readable mask image ({e.problem})") from None
    if mask.ndim == 3:
        if mask.shape[2] == 1 or (np.all(mask[..., :1] == mask[..., 1:3]) and mask.shape[2] in (3, 4)):
            mask = mask[..., 0]  # a grey PNG saved as RGB(A): every channel holds the label
        else:
            raise DataError(path, f"a mask must hold one class index per pixel, got {mask.shape[2]} differing channels")
    return mask


def check_mask(mask: np.ndarray, path: str, size: tuple[int, int], num_classes: int, ignore_index: int) -> None:
    """Raises DataError naming ``path`` when the mask's size or labels do not fit (``size`` is (w, h))."""
    h, w = mask.shape[:2]
    if (w, h) != tuple(size):
        raise DataError(path, f"mask is {w}x{h} but its image is {size[0]}x{size[1]}")
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != ignore_index)]
    if len(bad):
        shown = ", ".join(str(int(v)) for v in bad[:5])
        raise DataError(
            path, f"label values {shown} out of range (classes 0..{num_classes - 1}, ignore {ignore_index})"
        )


def _class_names(names: Sequence[str] | None, source: str) -> Categories:
    if not names:
        raise ConfigError(f"{source}: class-index masks need data.class_names (the classes 1..K; 0 is background)")
    return Categories.from_names(names)


def read_mask_folder(
    images_dir: str, masks_dir: str, class_names: Sequence[str] | None, ids_file: str | None = None
) -> SemanticSet:
    """Pairs every image under ``images_dir`` with ``masks_dir/<same relative path>.png``."""
    categories = _class_names(class_names, masks_dir)
    images_root, masks_root = Path(images_dir), Path(masks_dir)
    if not images_root.is_dir():
        raise DataError(images_dir, "image folder not found")
    if not masks_root.is_dir():
        raise DataError(masks_dir, "mask folder not found")
    paths = sorted(p for p in images_root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if ids_file:
        try:
            wanted = {ln.strip() for ln in Path(ids_file).read_text(encoding="utf-8").splitlines() if ln.strip()}
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(ids_file, f"cannot read id list ({getattr(e, 'strerror', None) or e})") from None
        paths = [p for p in paths if p.relative_to(images_root).with_suffix("").as_posix() in wanted]
    items = []
    for i, p in enumerate(paths):
        mask = masks_root / p.relative_to(images_root).with_suffix(".png")
        if not mask.is_file():
            raise DataError(str(p), f"no mask for this image (expected {mask})")
        items.append(SemanticItem(i + 1, str(p), str(mask)))
    return SemanticSet(categories, items, source=masks_dir)


def read_mask_list(list_file: str, class_names: Sequence[str] | None) -> SemanticSet:
    """``image mask`` per line (``#`` comments and blank lines skipped); paths relative to the file."""
    categories = _class_names(class_names, list_file)
    try:
        lines = Path(list_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(list_file, f"cannot read list file ({getattr(e, 'strerror', None) or e})") from None
    base = Path(list_file).parent
    items = []
    for n, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(list_file, f"line {n}: expected 'image_path mask_path', got {line!r}")
        image, mask = (str(Path(p) if Path(p).is_absolute() else base / p) for p in parts)
        if not Path(mask).is_file():
            raise DataError(list_file, f"line {n}: mask {mask} not found")
        items.append(SemanticItem(len(items) + 1, image, mask))
    return SemanticSet(categories, items, source=list_file)


def read_coco_semantic(ann: str, images_dir: str | None = None, allow_outside_paths: bool = False) -> SemanticSet:
    """COCO instances; class maps are rasterised per item when loaded."""
    det_set = read_coco(ann, images_dir, allow_outside_paths=allow_outside_paths)
    items = [
        SemanticItem(r.image_id, r.path, record=r, classes=np.unique(r.labels[~r.iscrowd]))
        for r in det_set.records
    ]
    return SemanticSet(det_set.categories, items, source=det_set.source)


def read_semantic_split(split: SplitConfig, root: str = "", class_names: Sequence[str] | None = None) -> SemanticSet:
    ann = resolve_path(root, split.ann)
    images = resolve_path(root, split.images)
    if not ann:
        raise ConfigError("data split has no 'ann' (mask folder, list file or COCO JSON)")
    if split.format == "coco":
        return read_coco_semantic(ann, images or None, split.allow_outside_paths)
    if split.format == "masks":
        if not images:
            raise ConfigError("a 'masks' split needs 'images' (the image folder) beside 'ann' (the mask folder)")
        return read_mask_folder(images, ann, class_names, resolve_path(root, split.ids))
    if split.format == "mask_list":
        return read_mask_list(ann, class_names)
    raise ConfigError(
        f"data format '{split.format}' cannot be read for semantic segmentation (one of {', '.join(SEMANTIC_FORMATS)})"
    )


def validate_set(sem_set: SemanticSet) -> SemanticSet:
    """Drops unreadable images (named in the log); checks every PNG mask and notes the classes it holds."""
    good = []
    for item in sem_set.items:
        try:
            size = read_image_size(item.path)
        except ImageReadError as e:
            log.warning("skipping unreadable image: %s", e)
            sem_set.skipped_images.append(str(e))
            continue
        if item.mask_path is not None:
            mask = _read_mask_file(item.mask_path)
            check_mask(mask, item.mask_path, size, sem_set.num_classes, sem_set.ignore_index)
            present = np.unique(mask)
            item.classes = present[(present > 0) & (present < sem_set.num_classes)].astype(np.int64)
        good.append(item)
    sem_set.items = good
    return sem_set


def build_semantic_sets(cfg: Config, check: bool = True) -> tuple[SemanticSet, SemanticSet]:
    """The train and val sets of a config; val takes train's class names so labels agree."""
    d = cfg.data
    train = read_semantic_split(d.train, d.root, d.class_names)
    names = list(train.categories.names)
    val = read_semantic_split(d.val, d.root, names) if d.val.ann else train
    if list(val.categories.names) != names:
        raise ConfigError(f"train and val class names differ: {names} vs {list(val.categories.names)}")
    for s in {id(train): train, id(val): val}.values():
        s.ignore_index = cfg.model.ignore_index
        s.crowd_ignore = d.crowd_ignore
        if check:
            validate_set(s)
    return train, val


# rasterising and loading ------------------------------------------------------------------------------


def rasterise_record(record: ImageRecord, ignore_index: int = 255, crowd_ignore: bool = True) -> np.ndarray:
    """HxW class map of a COCO record: instances painted by label in file order, crowd regions first.

    Crowd regions become ``ignore_index`` (when ``crowd_ignore``) except where an instance covers them.
    One instance mask is decoded at a time, so memory stays at one image whatever the instance count.
    """
    num = len(record)
    dtype = np.uint8 if max([ignore_index, *record.labels.tolist()]) < 256 else np.int32
    out = np.zeros((record.height, record.width), dtype)
    order = [k for k in range(num) if record.iscrowd[k]] + [k for k in range(num) if not record.iscrowd[k]]
    for k in order:
        if record.iscrowd[k] and not crowd_ignore:
            continue
        seg = record.segmentations[k] if record.segmentations is not None else None
        if seg is not None:
            m = segmentation_to_mask(seg, record.height, record.width).astype(bool)
        else:
            m = np.zeros((record.height, record.width), bool)
            x1, y1, x2, y2 = np.round(record.boxes[k]).astype(int)
            m[y1:y2, x1:x2] = True
        out[m] = ignore_index if record.iscrowd[k] else record.labels[k]
    return out


Sample = dict[str, Any]


class SemanticDataset(Dataset):
    """``(image float CHW in [0, 1], {"sem_seg": long HxW, "image_id": int})`` per item."""

    def __init__(self, sem_set: SemanticSet, transform: Callable[[Sample], Sample] | None = None):
        self.sem_set = sem_set
        self.transform = transform
        self.unreadable: set[int] = set()

    def __len__(self) -> int:
        return len(self.sem_set.items)

    def load_sample(self, index: int) -> Sample:
        item = self.sem_set.items[index]
        image = read_image(item.path)
        h, w = image.shape[:2]
        s = self.sem_set
        if item.mask_path is not None:
            mask = _read_mask_file(item.mask_path)
            check_mask(mask, item.mask_path, (w, h), s.num_classes, s.ignore_index)
        else:
            if (w, h) != (item.record.width, item.record.height):
                raise ImageReadError(
                    item.path, f"image is {w}x{h} but the annotations say {item.record.width}x{item.record.height}"
                )
            mask = rasterise_record(item.record, s.ignore_index, s.crowd_ignore)
        return {"image": image, "mask": mask, "image_id": item.image_id}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        _, sample = load_first_readable(index, len(self), self.load_sample, self.unreadable, self.sem_set.source)
        if self.transform is not None:
            sample = self.transform(sample)
        image = torch.from_numpy(np.ascontiguousarray(sample["image"])).permute(2, 0, 1).float().div_(255.0)
        target = {
            "sem_seg": torch.from_numpy(np.ascontiguousarray(sample["mask"]).astype(np.int64)),
            "image_id": int(sample["image_id"]),
        }
        return image, target


# transforms -------------------------------------------------------------------------------------------


class SemanticTransform:
    """An albumentations pipeline on ``image`` + ``mask`` (masks use nearest-neighbour resampling)."""

    def __init__(self, ops: list[A.BasicTransform]):
        self.pipeline = A.Compose(ops) if ops else None

    def __call__(self, sample: Sample) -> Sample:
        if self.pipeline is None:
            return sample
        out = self.pipeline(image=sample["image"], mask=sample["mask"])
        return {**sample, "image": out["image"], "mask": out["mask"]}


def build_semantic_train_transform(cfg: AugmentConfig) -> SemanticTransform:
    """The ``AugmentConfig`` options for image + mask: scale, crop (up to a quarter off each side),
    flips, 90-degree rotations and colour jitter.  AutoAugment policies are box policies: not used here."""
    crop = A.RandomCropFromBorders(crop_left=0.25, crop_right=0.25, crop_top=0.25, crop_bottom=0.25, p=cfg.crop)
    return SemanticTransform(augment_ops(cfg, crop))


def build_semantic_eval_transform() -> SemanticTransform:
    return SemanticTransform([])
