"""YOLO txt labels (+ an image folder) -> ``DetectionSet``.

A label file holds one object per line, ``class cx cy w h`` normalised to [0, 1], or a polygon
``class x1 y1 x2 y2 ...`` (the segmentation flavour).  A number outside [0, 1] (pixel coordinates
written by mistake, a negative size, ``inf`` or ``nan``) is an error naming the file and line, as
ultralytics rejects such files; a zero width or height is a zero-area box, dropped and reported.  The files carry no image sizes, so those are
read from the image headers; an image that cannot be read is reported and skipped.  Class ``k`` becomes
category id ``k + 1`` (COCO reserves 0 for nothing, and several tools treat it as background).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml

from vision.data.coco import bbox_list, clip_boxes, nonempty
from vision.data.image_io import list_images, read_image_size
from vision.data.records import Categories, DetectionSet, ImageRecord
from vision.errors import DataError, ImageReadError


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a text file (one per line) or a YOLO ``data.yaml`` (``names`` list or dict)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read class names ({getattr(e, 'strerror', None) or e})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise DataError(path, f"invalid YAML: {e}") from None
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            if not all(isinstance(k, int) and not isinstance(k, bool) for k in names):
                raise DataError(path, "'names' keys must be class indices 0, 1, 2, ...")
            names = [names[k] for k in sorted(names)]
        if not isinstance(names, list):
            raise DataError(path, "no 'names' list in the YAML file")
        names = [str(n) for n in names]
    else:
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not names:
        raise DataError(path, "no class names in the file")
    seen: set[str] = set()
    for name in names:
        if name in seen:  # the second class of that name could never be told apart from the first
            raise DataError(path, f"class name {name!r} appears twice")
        seen.add(name)
    return names


# Exporters round: a value a hair past 1 is the image border, not a pixel coordinate written by mistake.
_SLACK = 1e-6
_FIELD = {1: "cx", 2: "cy", 3: "width", 4: "height"}


def parse_yolo_labels(path: Path, width: int, height: int, num_classes: int) -> tuple[list, list, list]:
    """One label file -> (xyxy pixel boxes, class indices, polygon-or-None per object)."""
    boxes, classes, polygons = [], [], []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot read label file ({getattr(e, 'strerror', None) or e})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DataError(where, f"not a number in {line.strip()!r}") from None
        n = len(values)
        if n != 5 and (n < 7 or n % 2 == 0):
            raise DataError(where, f"expected 5 numbers (class cx cy w h) or a polygon (class x1 y1 x2 y2 x3 y3 ...), got {n}")
        cls = values[0]
        if not cls.is_integer() or not 0 <= cls < num_classes:
            raise DataError(where, f"class index {fields[0]} is not in 0..{num_classes - 1}")
        coords = np.asarray(values[1:], np.float64)
        bad = ~(np.isfinite(coords) & (coords >= -_SLACK) & (coords <= 1 + _SLACK))
        if bad.any():
            k = int(np.flatnonzero(bad)[0]) + 1
            raise DataError(
                where, f"{_FIELD[k] if n == 5 else 'coordinate'} {fields[k]} is not a fraction of the image side"
                " in [0, 1] (YOLO coordinates are normalised)"
            )
        if n == 5:
            cx, cy, w, h = coords
            boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
            polygons.append(None)
        else:
            xy = coords.reshape(-1, 2) * (width, height)
            boxes.append([xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()])
            polygons.append([xy.reshape(-1).round(2).tolist()])
        classes.append(int(cls))
    return boxes, classes, polygons


def read_yolo(
    labels_dir: str | os.PathLike, images_dir: str | os.PathLike, names: list[str] | str | os.PathLike
) -> DetectionSet:
    """Reads YOLO labels; each image under ``images_dir`` pairs with ``labels_dir/<same relative stem>.txt``."""
    labels_dir, images_dir = Path(labels_dir), Path(images_dir)
    if not labels_dir.is_dir():
        raise DataError(labels_dir, "not a folder of YOLO label files")
    if not images_dir.is_dir():
        raise DataError(images_dir, "not an image folder")
    class_names = names if isinstance(names, list) else read_class_names(names)
    categories = Categories.from_names(class_names)
    records: list[ImageRecord] = []
    dropped: list[str] = []
    skipped: list[str] = []
    for image_path in list_images(images_dir):
        rel = Path(image_path).relative_to(images_dir)
        try:
            width, height = read_image_size(image_path)
        except ImageReadError as e:
            skipped.append(str(e))
            continue
        label_file = labels_dir / rel.with_suffix(".txt")
        boxes, classes, polygons = (
            parse_yolo_labels(label_file, width, height, len(class_names)) if label_file.exists() else ([], [], [])
        )
        box_arr = clip_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), width, height)
        keep = nonempty(box_arr)
        dropped += [f"{label_file}: object {k + 1} has a zero-area box {bbox_list(boxes[k])}" for k in np.flatnonzero(~keep)]
        record = ImageRecord(
            image_id=len(records) + 1,
            file_name=rel.as_posix(),
            path=image_path,
            width=width,
            height=height,
            boxes=box_arr,
            labels=np.asarray(classes, np.int64) + 1,
            iscrowd=np.zeros(len(classes), bool),
            difficult=np.zeros(len(classes), bool),
            segmentations=polygons if any(p is not None for p in polygons) else None,
        )
        records.append(record.select(keep))
    return DetectionSet(categories, records, source=str(labels_dir), dropped=dropped, skipped_images=skipped)
