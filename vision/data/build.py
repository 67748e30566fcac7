"""From a config's ``data`` section to data sets: pick the reader, resolve paths, check the images."""

from __future__ import annotations

import logging
from pathlib import Path

from vision.config import Config, SplitConfig, resolve_path
from vision.data.coco import read_coco
from vision.data.image_check import check_images_once_per_job
from vision.data.records import DetectionSet
from vision.data.voc import read_voc
from vision.data.yolo import read_yolo
from vision.errors import ConfigError

log = logging.getLogger(__name__)

READERS = ("coco", "voc", "yolo")


def read_split(split: SplitConfig, root: str = "", class_names: list[str] | None = None) -> DetectionSet:
    """Reads one split with the reader its ``format`` names."""
    ann = resolve_path(root, split.ann)
    images = resolve_path(root, split.images)
    if not ann:
        raise ConfigError("data split has no 'ann' (annotation file or folder)")
    outside = split.allow_outside_paths
    if split.format == "coco":
        return read_coco(ann, images or None, allow_outside_paths=outside)
    if split.format == "voc":
        return read_voc(
            ann, images or None, ids_file=resolve_path(root, split.ids), class_names=class_names,
            allow_outside_paths=outside,
        )
    if split.format == "yolo":
        names = class_names or resolve_path(root, split.names)
        if not names:
            raise ConfigError("a YOLO split needs 'names' (class-names file) or data.class_names")
        return read_yolo(ann, images or Path(ann).parent / "images", names)
    raise ConfigError(f"unknown data format '{split.format}' (expected one of {', '.join(READERS)})")


def drop_unreadable_images(det_set: DetectionSet) -> DetectionSet:
    """Removes images whose file is missing, empty, truncated, oversized or not an image, naming each one.

    Only headers and end markers are read (no decoding), by a thread pool, once per job, and the answers
    are cached beside the set's annotations (``vision.data.image_check``), so this costs little even for large
    sets and catches the bad files before they stall a training run.
    """
    errors = check_images_once_per_job([record.path for record in det_set.records], det_set.source or None)
    good = []
    for record in det_set.records:
        error = errors.get(record.path)
        if error is not None:
            log.warning("skipping unreadable image: %s", error)
            det_set.skipped_images.append(error)
            continue
        good.append(record)
    det_set.records = good
    return det_set


def build_datasets(cfg: Config, check_images: bool = True) -> tuple[DetectionSet, DetectionSet]:
    """The train and val data sets of a config; val reuses train's class names so labels agree."""
    data = cfg.data
    train = read_split(data.train, data.root, data.class_names)
    names = data.class_names or list(train.categories.names)
    val = read_split(data.val, data.root, names) if data.val.ann else train
    if list(val.categories.names) != list(train.categories.names):
        raise ConfigError(
            f"train and val class names differ: {list(train.categories.names)} vs {list(val.categories.names)}"
        )
    if check_images:
        for det_set in {id(train): train, id(val): val}.values():
            drop_unreadable_images(det_set)
    return train, val
