"""Pascal VOC XML -> ``DetectionSet``.

VOC numbers pixels from 1 and makes ``xmax``/``ymax`` inclusive; as detectron2 does, ``xmin``/``ymin``
are shifted by one so that boxes become 0-based continuous coordinates (a 1-pixel box at pixel 1 spans
[0, 1]).  ``difficult`` objects are kept and flagged; training may skip them.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from vision.data.annotation_checks import file_name_problem
from vision.data.coco import bbox_list, clip_boxes, nonempty
from vision.data.records import Categories, DetectionSet, ImageRecord
from vision.errors import DataError


def _text(node: ET.Element, tag: str) -> str | None:
    child = node.find(tag)
    return child.text.strip() if child is not None and child.text is not None else None


def _number(node: ET.Element, tag: str, path: str, what: str) -> float:
    value = _text(node, tag)
    if value is None:
        raise DataError(path, f"{what} has no <{tag}>")
    try:
        number = float(value)
    except ValueError:
        raise DataError(path, f"{what}: <{tag}> is not a number ({value!r})") from None
    if not math.isfinite(number):
        raise DataError(path, f"{what}: <{tag}> is not a finite number ({value!r})")
    return number


def _size(node: ET.Element, tag: str, path: str) -> int:
    value = _number(node, tag, path, "<size>")
    if value <= 0 or not value.is_integer():
        raise DataError(path, f"<size>: <{tag}> must be a positive whole number of pixels, got {_text(node, tag)!r}")
    return int(value)


def parse_voc_xml(path: str | os.PathLike, allow_outside_paths: bool = False) -> dict:
    """One VOC annotation file -> ``{filename, width, height, objects: [(name, xyxy, difficult)]}``.

    Boxes come back 0-based (``xmin``/``ymin`` minus one); degenerate ones are left as written.
    Sizes must be positive whole numbers and coordinates finite (an ``inf`` would clip to a box
    reaching the border); ``<filename>`` must stay inside the image folder unless ``allow_outside_paths``.
    """
    path = str(path)
    try:
        root = ET.parse(path).getroot()
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except ET.ParseError as e:
        raise DataError(path, f"invalid XML: {e}") from None
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror or e})") from None
    size = root.find("size")
    if size is None:
        raise DataError(path, "missing <size> (image width and height)")
    width = _size(size, "width", path)
    height = _size(size, "height", path)
    objects = []
    for k, obj in enumerate(root.findall("object")):
        what = f"object {k + 1}"
        name = _text(obj, "name")
        if not name:
            raise DataError(path, f"{what} has no <name>")
        box = obj.find("bndbox")
        if box is None:
            raise DataError(path, f"{what} ({name}) has no <bndbox>")
        xyxy = [_number(box, t, path, f"{what} ({name})") for t in ("xmin", "ymin", "xmax", "ymax")]
        # A box written with xmax <= xmin is degenerate as annotated, even though VOC's inclusive
        # convention would make it one pixel wide: mark it empty so readers drop and report it.
        degenerate = xyxy[2] <= xyxy[0] or xyxy[3] <= xyxy[1]
        if not degenerate:
            xyxy[0] -= 1.0
            xyxy[1] -= 1.0
        difficult = _text(obj, "difficult") in ("1", "true", "True")
        objects.append((name, xyxy, difficult))
    filename = _text(root, "filename") or Path(path).stem + ".jpg"
    problem = file_name_problem(filename, allow_outside_paths)
    if problem:
        raise DataError(path, f"<filename>: {problem.replace('file_name ', '', 1)}")
    return {"filename": filename, "width": width, "height": height, "objects": objects}


def read_voc(
    ann_dir: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    *,
    ids_file: str | os.PathLike | None = None,
    class_names: list[str] | None = None,
    allow_outside_paths: bool = False,
) -> DetectionSet:
    """Reads a folder of VOC XML files (or those an ImageSets list names).

    Class names come from ``class_names`` when given (an unknown name is then an error), else from the
    sorted set of names found, so the same folder always gives the same label order.
    """
    ann_dir = Path(ann_dir)
    if not ann_dir.is_dir():
        raise DataError(ann_dir, "not a folder of VOC XML files")
    if ids_file is not None:
        try:
            ids = [ln.split()[0] for ln in Path(ids_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(ids_file, f"cannot read image list ({getattr(e, 'strerror', None) or e})") from None
        files = [ann_dir / f"{i}.xml" for i in ids]
    else:
        files = sorted(ann_dir.glob("*.xml"))
    if not files:
        raise DataError(ann_dir, "no .xml annotation files found")
    parsed = [(f, parse_voc_xml(f, allow_outside_paths)) for f in files]
    if class_names is None:
        class_names = sorted({name for _, p in parsed for name, _, _ in p["objects"]})
    categories = Categories.from_names(class_names)
    images_dir = Path(images_dir) if images_dir else ann_dir.parent / "JPEGImages"

    records: list[ImageRecord] = []
    dropped: list[str] = []
    for image_id, (f, p) in enumerate(parsed, start=1):
        labels = []
        for name, _, _ in p["objects"]:
            if name not in categories.names:
                raise DataError(f, f"class {name!r} is not among the class names {list(categories.names)}")
            labels.append(categories.label_of_name(name))
        boxes = np.asarray([o[1] for o in p["objects"]], np.float32).reshape(-1, 4)
        boxes = clip_boxes(boxes, p["width"], p["height"])
        keep = nonempty(boxes)
        dropped += [
            f"{f.name}: object {k + 1} ({p['objects'][k][0]}) has a zero-area box {bbox_list(p['objects'][k][1])}"
            for k in np.flatnonzero(~keep)
        ]
        record = ImageRecord(
            image_id=image_id,
            file_name=p["filename"],
            path=str(images_dir / p["filename"]),
            width=p["width"],
            height=p["height"],
            boxes=boxes,
            labels=np.asarray(labels, np.int64),
            iscrowd=np.zeros(len(labels), bool),
            difficult=np.asarray([o[2] for o in p["objects"]], bool),
        )
        records.append(record.select(keep))
    return DetectionSet(categories, records, source=str(ann_dir), dropped=dropped)
