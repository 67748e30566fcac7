"""COCO JSON <-> ``DetectionSet``.

Real exports are untidy: ids that skip numbers, a placeholder category nobody uses, boxes that poke
past the border, boxes of zero area, images without annotations, crowd regions, polygons and RLE side
by side.  All of these load; category ids are kept as they are so results can be written back with the
user's own ids.  What cannot be made sense of is rejected with the file and the offending entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from vision.atomic import atomic_write
from vision.data.annotation_checks import (
    compressed_rle_problems,
    describe,
    file_name_problem,
    finite_number,
    flag,
    integer_id,
    segmentation_problem,
)
from vision.data.records import Categories, DetectionSet, ImageRecord
from vision.errors import DataError


def load_json(path: str | os.PathLike) -> Any:
    """Parses a JSON file; a syntax error becomes one line with the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"not a UTF-8 text file ({e.reason})") from None
    except OSError as e:
        raise DataError(path, f"cannot read file ({e.strerror or e})") from None


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clips xyxy boxes to the image, as every reader must before dropping the degenerate ones."""
    out = boxes.astype(np.float32, copy=True)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    return out


def nonempty(boxes: np.ndarray) -> np.ndarray:
    """Boxes with positive width and height (zero-area boxes carry no signal and break box coders)."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def bbox_list(box: Any) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"


def _segmentation_box(seg: Any, height: int, width: int) -> list[float] | None:
    from pycocotools import mask as mask_utils

    rles = _to_rles(seg, height, width)
    if rles is None:
        return None
    x, y, w, h = mask_utils.toBbox(mask_utils.merge(rles)).tolist()
    return [x, y, w, h]


def _to_rles(seg: Any, height: int, width: int) -> list[dict] | None:
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        polys = [p for p in seg if len(p) >= 6]
        return mask_utils.frPyObjects(polys, height, width) if polys else None
    if isinstance(seg, dict) and "counts" in seg:
        if isinstance(seg["counts"], list):
            return [mask_utils.frPyObjects(seg, height, width)]
        rle = dict(seg)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
        return [rle]
    return None


def segmentation_to_mask(seg: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as an HxW uint8 mask."""
    from pycocotools import mask as mask_utils

    rles = _to_rles(seg, height, width)
    if not rles:
        return np.zeros((height, width), np.uint8)
    return mask_utils.decode(mask_utils.merge(rles)).astype(np.uint8)


def segmentation_area(seg: Any, height: int, width: int) -> float | None:
    from pycocotools import mask as mask_utils

    rles = _to_rles(seg, height, width)
    return float(mask_utils.area(mask_utils.merge(rles))) if rles else None


def _require(entry: dict, keys: tuple[str, ...], path: str, what: str) -> None:
    missing = [k for k in keys if k not in entry]
    if missing:
        ident = f" {entry['id']}" if "id" in entry else ""
        raise DataError(path, f"{what}{ident} has no '{missing[0]}'")


def _entries(data: dict[str, Any], key: str, path: str, what: str) -> list[dict[str, Any]]:
    entries = data.get(key, [])
    if not isinstance(entries, list):
        raise DataError(path, f"'{key}' must be a list, got {describe(entries)}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(path, f"{what} at index {i} in '{key}' must be an object, got {describe(entry)}")
    return entries


def _positive_int(x: Any) -> int | None:
    if finite_number(x) and x > 0 and float(x).is_integer():
        return int(x)
    return None


def _annotation_name(ann: dict[str, Any], index: int) -> str:
    return f"annotation {ann['id']}" if "id" in ann else f"annotation at index {index}"


def _categories(categories: list[dict[str, Any]], path: str) -> Categories:
    for c in categories:
        _require(c, ("id",), path, "category")
        if not integer_id(c["id"]):
            raise DataError(path, f"category {c['id']!r}: id must be an integer, got {describe(c['id'])}")
    try:
        return Categories.from_coco(categories)
    except ValueError as e:
        raise DataError(path, str(e)) from None


def _image_problem(img: dict[str, Any], allow_outside_paths: bool) -> str | None:
    if not integer_id(img["id"]):
        return f"id must be an integer, got {describe(img['id'])}"
    return file_name_problem(img["file_name"], allow_outside_paths)


def coco_to_detection_set(
    data: dict[str, Any], path: str, images_dir: str | os.PathLike | None = None, *,
    allow_outside_paths: bool = False,
) -> DetectionSet:
    """Validates a parsed COCO dict and turns it into records (boxes clipped, zero-area boxes dropped).

    Every entry is checked as it is read (types of ids, file names, bbox numbers, polygons and RLE
    masks against the image size), and the first bad one is a ``DataError`` naming the entry and its
    image.  Image file names must stay inside ``images_dir`` unless ``allow_outside_paths``.
    """
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(path, "not a COCO data set (no 'images' list)")
    if not isinstance(data["images"], list):
        raise DataError(path, f"'images' must be a list, got {describe(data['images'])}")
    images = _entries(data, "images", path, "image")
    annotations = _entries(data, "annotations", path, "annotation")
    cats = _categories(_entries(data, "categories", path, "category"), path)
    images_dir = Path(images_dir) if images_dir else Path(path).parent

    by_image: dict[int, list[tuple[int, dict]]] = {}
    for img in images:
        _require(img, ("id", "file_name"), path, "image")
        problem = _image_problem(img, allow_outside_paths)
        if problem:
            raise DataError(path, f"image {img['id']!r}: {problem}")
        if img["id"] in by_image:
            raise DataError(path, f"image id {img['id']} appears twice in 'images'")
        by_image[img["id"]] = []
    file_names = {img["id"]: img["file_name"] for img in images}
    for index, ann in enumerate(annotations):
        _require(ann, ("image_id", "category_id"), path, "annotation")
        name = _annotation_name(ann, index)
        image_id = ann["image_id"]
        if not integer_id(image_id) or image_id not in by_image:
            shown = image_id if integer_id(image_id) else describe(image_id)
            raise DataError(path, f"{name}: image_id {shown} is not in 'images'")
        where = f"{name} (image {file_names[image_id]!r})"
        cat = ann["category_id"]
        if not integer_id(cat):
            raise DataError(path, f"{where}: category_id must be an integer, got {describe(cat)}")
        if not cats.has_id(cat):
            raise DataError(path, f"{where}: category_id {cat} is not in 'categories'")
        for key in ("iscrowd", "difficult"):
            if key in ann and not flag(ann[key]):
                raise DataError(path, f"{where}: {key} must be 0 or 1, got {describe(ann[key])}")
        by_image[image_id].append((index, ann))

    sizes = {}
    for img in images:
        width, height = _positive_int(img.get("width")), _positive_int(img.get("height"))
        if width is None or height is None:
            raise DataError(path, f"image {img['id']} ({img['file_name']}): width and height must be positive integers")
        sizes[img["id"]] = (height, width)
    _check_segmentations(annotations, sizes, file_names, path)

    records: list[ImageRecord] = []
    dropped: list[str] = []
    for img in images:
        height, width = sizes[img["id"]]
        anns = [ann for _, ann in by_image[img["id"]]]
        boxes, labels, crowd, difficult, segs = [], [], [], [], []
        for index, ann in by_image[img["id"]]:
            where = f"{_annotation_name(ann, index)} (image {img['file_name']!r})"
            seg = ann.get("segmentation")
            if seg is None or seg == [] or seg == {}:
                seg = None
            bbox = ann.get("bbox")
            if bbox is None and seg is not None:
                bbox = _segmentation_box(seg, height, width)
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(finite_number(v) for v in bbox)):
                shown = bbox_text(bbox)
                raise DataError(path, f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {shown}")
            x, y, w, h = bbox
            boxes.append([x, y, x + w, y + h])
            labels.append(cats.label_of(ann["category_id"]))
            crowd.append(bool(ann.get("iscrowd", 0)))
            difficult.append(bool(ann.get("difficult", 0)))
            segs.append(seg)
        box_arr = clip_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), width, height)
        keep = nonempty(box_arr)
        dropped += [
            f"annotation {anns[k].get('id', '?')} (image {img['id']}): zero-area box {bbox_list(boxes[k])}"
            for k in np.flatnonzero(~keep)
        ]
        record = ImageRecord(
            image_id=img["id"],
            file_name=img["file_name"],
            path=str(images_dir / img["file_name"]),
            width=width,
            height=height,
            boxes=box_arr,
            labels=np.asarray(labels, np.int64),
            iscrowd=np.asarray(crowd, bool),
            difficult=np.asarray(difficult, bool),
            segmentations=segs if any(s is not None for s in segs) else None,
        )
        records.append(record.select(keep))
    return DetectionSet(cats, records, source=str(path), dropped=dropped)


def _check_segmentations(
    annotations: list[dict[str, Any]], sizes: dict[int, tuple[int, int]], file_names: dict[int, str], path: str
) -> None:
    """The first bad segmentation in file order is a DataError; compressed RLE strings are decoded
    together, in one vectorised pass over the file."""
    compressed: list[int] = []
    for index, ann in enumerate(annotations):
        seg = ann.get("segmentation")
        if seg is None or seg == [] or seg == {}:
            continue
        height, width = sizes[ann["image_id"]]
        problem = segmentation_problem(seg, height, width, check_compressed=False)
        if problem is None and isinstance(seg, dict) and isinstance(seg["counts"], (str, bytes)):
            compressed.append(index)
            continue
        if problem:
            _raise_first_segmentation_problem(annotations, compressed, sizes, file_names, path, (index, problem))
    _raise_first_segmentation_problem(annotations, compressed, sizes, file_names, path, None)


def _raise_first_segmentation_problem(
    annotations: list[dict[str, Any]], compressed: list[int], sizes: dict[int, tuple[int, int]],
    file_names: dict[int, str], path: str, found: tuple[int, str] | None,
) -> None:
    """Raises for the earliest problem: ``found`` or one of the compressed RLEs read before it."""
    strings = [annotations[i]["segmentation"]["counts"] for i in compressed]
    problems = compressed_rle_problems(strings, [sizes[annotations[i]["image_id"]] for i in compressed])
    bad = [(i, p) for i, p in zip(compressed, problems) if p]
    if found is not None:
        bad.append(found)
    if bad:
        index, problem = min(bad)
        ann = annotations[index]
        where = f"{_annotation_name(ann, index)} (image {file_names[ann['image_id']]!r})"
        raise DataError(path, f"{where}: {problem}")


def bbox_text(bbox: Any) -> str:
    """A bad bbox value for a one-line message (JSON-ish, shortened)."""
    try:
        text = json.dumps(bbox, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(bbox)
    return text if len(text) <= 80 else text[:77] + "..."


def read_coco(
    path: str | os.PathLike, images_dir: str | os.PathLike | None = None, *, allow_outside_paths: bool = False
) -> DetectionSet:
    """Reads a COCO JSON file; images are looked up in ``images_dir`` (default: the file's folder)."""
    return coco_to_detection_set(load_json(path), str(path), images_dir, allow_outside_paths=allow_outside_paths)


def record_annotations(record: ImageRecord, categories: Categories, first_id: int = 1) -> list[dict[str, Any]]:
    """A record's instances as COCO annotation dicts (area from the mask where there is one)."""
    out = []
    for k in range(len(record)):
        x1, y1, x2, y2 = (float(v) for v in record.boxes[k])
        seg = record.segmentations[k] if record.segmentations is not None else None
        area = segmentation_area(seg, record.height, record.width) if seg is not None else None
        ann: dict[str, Any] = {
            "id": first_id + k,
            "image_id": record.image_id,
            "category_id": categories.id_of(int(record.labels[k])),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "area": area if area is not None else (x2 - x1) * (y2 - y1),
            "iscrowd": int(record.iscrowd[k]),
        }
        if seg is not None:
            ann["segmentation"] = seg
        if record.difficult[k]:
            ann["difficult"] = 1
        out.append(ann)
    return out


def to_coco_dict(det_set: DetectionSet) -> dict[str, Any]:
    """The data set as a COCO dict (the ground truth pycocotools evaluates against)."""
    images, annotations = [], []
    for record in det_set.records:
        images.append(
            {"id": record.image_id, "file_name": record.file_name, "width": record.width, "height": record.height}
        )
        annotations.extend(record_annotations(record, det_set.categories, len(annotations) + 1))
    return {"images": images, "annotations": annotations, "categories": det_set.categories.to_coco()}


def write_coco(det_set: DetectionSet, path: str | os.PathLike) -> None:
    """Writes COCO JSON atomically, so an interrupted write never leaves half a file behind."""
    with atomic_write(path, "w") as f:
        f.write(json.dumps(to_coco_dict(det_set), default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.decode("ascii")
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
