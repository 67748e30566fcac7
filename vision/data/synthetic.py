"""A procedural COCO data set: shapes on textured backgrounds, with exact instance masks.

Tests and the demo need detection / segmentation data that is small, made in seconds, free of
licences and downloads, and whose ground truth is known to the pixel.  Shapes are the classes; their
colour, fill, size, rotation and the background are random and independent of the class, so a model
has to learn shape.  Backgrounds mix smooth noise, gradients, stripes, unannotated colour blobs and
lines so that "anything not flat is an object" does not work either.  ``style="plain"`` is the easy
version a person sees at a glance (the demo's): a flat or gently shaded background without clutter, and
flat-coloured shapes that stand out from what lies under them.

Every shape is a set of polygons rasterised by pycocotools' own polygon rasteriser, so a shape written
as a COCO polygon decodes to exactly the pixels that were painted; occluded shapes and shapes with
holes (ring, crescent) are written as RLE of their visible pixels.  Shapes are placed one after the
other; a placement that would hide too much of an earlier shape is rejected and tried elsewhere, so
every painted shape is annotated, and no pixel belongs to two instances.

The same seed and arguments give the same bytes (JSON and pixels).  Class frequencies are allocated,
not sampled (largest remainder over the split, then shuffled), so a requested long tail holds even on a
small split; which classes an image holds therefore depends on the split's size, while everything else
about image ``i`` comes from ``(seed, split, i)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_util

from vision.data.synthetic_art import (
    SHAPES,
    Polys,
    ShapeFn,
    background,
    plain_background,
    plain_fill,
    textured_fill,
)
from vision.errors import VisionError

DEFAULT_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ellipse", "cross")


_SPLITS = {"train": 0, "val": 1}
_PURPOSE_IMAGE, _PURPOSE_ALLOCATE = 0, 1


# --------------------------------------------------------------------------------------------------
# One image.


@dataclass(frozen=True)
class _Spec:
    width: int
    height: int
    names: tuple[str, ...]
    min_objects: int
    max_objects: int
    min_size: float
    max_size: float
    max_occlusion: float
    min_visible_pixels: int
    polygon_fraction: float
    seed: int
    style: str = "textured"


@dataclass
class _Instance:
    label: int  # contiguous, 1..K
    polys: Polys  # pixel coordinates, for the polygon encoding
    polygon_ok: bool  # no cut-outs, so the polygons alone describe the shape
    area: int  # pixels before occlusion


def _rasterise(polys: Polys, h: int, w: int) -> np.ndarray:
    rles = mask_util.frPyObjects([p.ravel().tolist() for p in polys], h, w)
    return np.ascontiguousarray(mask_util.decode(mask_util.merge(rles))).astype(bool)


def _shape_polys(
    rng: np.random.Generator, fn: ShapeFn, size: float, spec: _Spec
) -> tuple[Polys, Polys] | None:
    """The shape rotated, scaled to ``size`` pixels across and placed inside the image, vertices on a
    quarter-pixel grid (exact in binary, so the JSON round trip rasterises to the same pixels)."""
    fill, cut = fn(rng)
    scale = 1.0 / max(float(np.linalg.norm(p, axis=1).max()) for p in fill)
    a = rng.uniform(0, 2 * np.pi)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    r = size / 2 * scale
    fill = [p @ rot.T * r for p in fill]
    cut = [p @ rot.T * r for p in cut]
    lo = np.min([p.min(0) for p in fill], 0)
    hi = np.max([p.max(0) for p in fill], 0)
    room = np.array([spec.width - 2.0, spec.height - 2.0]) - (hi - lo)
    if (room < 0).any():
        return None
    offset = 1.0 + rng.uniform(0, 1, 2) * room - lo
    fill = [np.round((p + offset) * 4) / 4 for p in fill]
    cut = [np.round((p + offset) * 4) / 4 for p in cut]
    return fill, cut


def _place(
    rng: np.random.Generator, label: int, spec: _Spec, idmap: np.ndarray, full: list[int], vis: list[int]
) -> tuple[_Instance, np.ndarray] | None:
    """Find a spot where the new shape leaves every earlier one visible enough; None after many tries."""
    fn = SHAPES[spec.names[label - 1]]
    size = math.exp(rng.uniform(math.log(spec.min_size), math.log(spec.max_size)))
    for attempt in range(30):
        if attempt and attempt % 10 == 0:
            size = max(spec.min_size, size * 0.7)
        placed = _shape_polys(rng, fn, size, spec)
        if placed is None:
            size = max(spec.min_size, size * 0.7)
            continue
        fill, cut = placed
        mask = _rasterise(fill, spec.height, spec.width)
        if cut:
            mask &= ~_rasterise(cut, spec.height, spec.width)
        area = int(mask.sum())
        if area < spec.min_visible_pixels:
            continue
        if full:
            covered = np.bincount(idmap[mask], minlength=len(full) + 1)[1:]
            left = np.asarray(vis) - covered
            need = np.maximum((1 - spec.max_occlusion) * np.asarray(full), spec.min_visible_pixels)
            if (left < need).any():
                continue
        return _Instance(label, fill, not cut, area), mask
    return None


def _render(spec: _Spec, split: str, index: int, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray,
                                                                                   list[_Instance]]:
    """One image (uint8 RGB), its instance-id map (0 background, i for instance i) and instances."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _SPLITS[split], _PURPOSE_IMAGE, index]))
    h, w = spec.height, spec.width
    plain = spec.style == "plain"
    img = plain_background(rng, h, w) if plain else background(rng, h, w)
    idmap = np.zeros((h, w), np.int32)
    instances: list[_Instance] = []
    full: list[int] = []
    vis: list[int] = []
    for label in labels:
        placed = _place(rng, label, spec, idmap, full, vis)
        if placed is None:
            continue
        inst, mask = placed
        if full:
            covered = np.bincount(idmap[mask], minlength=len(full) + 1)[1:]
            vis = [v - int(c) for v, c in zip(vis, covered)]
        instances.append(inst)
        full.append(inst.area)
        vis.append(inst.area)
        idmap[mask] = len(instances)
        img[mask] = plain_fill(rng, img, mask) if plain else textured_fill(rng, img, mask)
    spread = rng.uniform(0, 8 if plain else 24)  # sensor-like noise, uniform because it is 4x cheaper than normal
    if spread > 2:
        img += np.float32(spread) * (rng.random(img.shape, dtype=np.float32) - np.float32(0.5))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), idmap, instances


# --------------------------------------------------------------------------------------------------
# Class allocation.


def class_weights(num_classes: int, long_tail: float | None) -> np.ndarray:
    """Relative class frequencies: equal, or geometric from 1 (first class) down to 1/long_tail."""
    if not long_tail or num_classes == 1:
        return np.ones(num_classes)
    return np.asarray(long_tail, float) ** (-np.arange(num_classes) / (num_classes - 1))


def _allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` closest to the weights (largest remainder), each class at
    least once when there is room, so a rare class is rare but present."""
    target = weights / weights.sum() * total
    counts = np.floor(target).astype(int)
    order = np.argsort(-(target - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    if total >= len(weights):
        for k in np.flatnonzero(counts == 0):
            counts[int(np.argmax(counts))] -= 1
            counts[k] += 1
    return counts


def _labels_per_image(
    spec: _Spec, split: str, n: int, weights: np.ndarray, one_class: bool, empty_fraction: float
) -> list[list[int]]:
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _SPLITS[split], _PURPOSE_ALLOCATE]))
    sizes = rng.integers(spec.min_objects, spec.max_objects + 1, n)
    empty = rng.permutation(n)[: round(n * empty_fraction)]
    sizes[empty] = 0
    k = len(weights)
    if one_class:
        busy = np.flatnonzero(sizes > 0)
        classes = rng.permutation(np.repeat(np.arange(1, k + 1), _allocate(len(busy), weights)))
        out = [[] for _ in range(n)]
        for i, c in zip(busy, classes):
            out[i] = [int(c)] * int(sizes[i])
        return out
    pool = rng.permutation(np.repeat(np.arange(1, k + 1), _allocate(int(sizes.sum()), weights)))
    ends = np.cumsum(sizes)
    return [pool[e - s:e].astype(int).tolist() for s, e in zip(sizes, ends)]


# --------------------------------------------------------------------------------------------------
# Writing.


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _annotations(
    rng: np.random.Generator, idmap: np.ndarray, instances: list[_Instance], cat_ids: Sequence[int],
    image_id: int, next_id: int, polygon_fraction: float,
) -> list[dict[str, Any]]:
    anns = []
    for i, inst in enumerate(instances, start=1):
        visible = idmap == i
        rle = _rle(visible)
        area = int(mask_util.area(rle))
        as_polygon = rng.random() < polygon_fraction and inst.polygon_ok and area == inst.area
        seg: Any = [p.ravel().tolist() for p in inst.polys] if as_polygon else rle
        anns.append({
            "id": next_id + len(anns),
            "image_id": image_id,
            "category_id": int(cat_ids[inst.label - 1]),
            "segmentation": seg,
            "area": area,
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "iscrowd": 0,
        })
    return anns


def _semantic(idmap: np.ndarray, instances: list[_Instance], ignore_width: int) -> np.ndarray:
    lut = np.array([0] + [inst.label for inst in instances], np.uint8)
    sem = lut[idmap]
    if ignore_width > 0:
        k = np.ones((2 * ignore_width + 1,) * 2, np.uint8)
        ids = idmap.astype(np.float32)
        sem[cv2.dilate(ids, k) != cv2.erode(ids, k)] = 255
    return sem


def _write_image(path: Path, img: np.ndarray, params: list[int]) -> None:
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), img, params):
        raise VisionError(f"{path}: could not write image")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise VisionError(f"synthetic data set: {message}")


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    *,
    num_train: int = 200,
    num_val: int = 50,
    image_size: tuple[int, int] = (320, 240),
    classes: Sequence[str] | int = DEFAULT_CLASSES,
    min_objects: int = 1,
    max_objects: int = 6,
    long_tail: float | None = None,
    balanced_val: bool = False,
    one_class_per_image: bool = False,
    seed: int = 0,
    min_object_size: float | None = None,
    max_object_size: float | None = None,
    max_occlusion: float = 0.5,
    min_visible_pixels: int = 24,
    polygon_fraction: float = 0.5,
    contiguous_ids: bool = False,
    semantic: bool = False,
    semantic_ignore_width: int = 0,
    empty_fraction: float = 0.0,
    image_format: str = "png",
    style: str = "textured",
) -> dict[str, Any]:
    """Write ``train.json``, ``val.json`` and ``images/`` (and ``semantic/`` if asked) under ``out_dir``.

    ``classes`` names shapes from ``SHAPES`` or gives how many of them to use, in that order; with
    ``long_tail=R`` the first class is R times as frequent as the last, geometric in between (instances,
    or images when ``one_class_per_image``); ``balanced_val`` keeps the validation split's classes
    equally frequent, so that a rare class's AP rests on as many instances as a common one's.  Category
    ids are 1, 3, 5, ... unless ``contiguous_ids``, because real exports are rarely 1..K and readers
    must not assume it.  Shape diameters are drawn
    log-uniformly between ``min_object_size`` (default 16 px, less on tiny images) and
    ``max_object_size`` (default 45% of the shorter side); ``max_occlusion`` is the largest
    share of a shape a later one may hide.  ``polygon_fraction`` of the shapes that can be (unoccluded,
    no holes) are written as polygons, the rest as RLE.  Semantic masks hold the contiguous label
    (1..K in category-id order, 0 background, 255 along instance boundaries when
    ``semantic_ignore_width`` > 0).  ``style`` is ``"textured"`` (cluttered backgrounds, textured
shapes: the hard default) or ``"plain"`` (plain backgrounds, flat high-contrast shapes, little noise).
Returns paths and per-class instance counts.
    """
    width, height = (int(v) for v in image_size)
    if isinstance(classes, int):
        _check(1 <= classes <= len(SHAPES), f"classes must be 1..{len(SHAPES)}, got {classes}")
        names = tuple(SHAPES)[:classes]
    else:
        names = tuple(classes)
        unknown = [n for n in names if n not in SHAPES]
        _check(not unknown, f"unknown shape class {unknown}; known: {', '.join(SHAPES)}")
        _check(len(set(names)) == len(names) and names, "classes must be distinct and non-empty")
    _check(num_train >= 0 and num_val >= 0, "image counts must be >= 0")
    _check(width >= 16 and height >= 16, f"image size must be at least 16x16, got {width}x{height}")
    _check(0 <= min_objects <= max_objects, "need 0 <= min_objects <= max_objects")
    _check(long_tail is None or long_tail >= 1, f"long_tail must be >= 1, got {long_tail}")
    _check(isinstance(seed, int) and seed >= 0, f"seed must be a non-negative integer, got {seed}")
    _check(0 <= max_occlusion < 1, "max_occlusion must be in [0, 1)")
    _check(0 <= polygon_fraction <= 1 and 0 <= empty_fraction <= 1, "fractions must be in [0, 1]")
    _check(image_format in ("png", "jpg"), f"image_format must be png or jpg, got {image_format!r}")
    _check(style in ("textured", "plain"), f"style must be textured or plain, got {style!r}")
    max_size = float(max_object_size or 0.45 * min(width, height))
    max_size = min(max_size, min(width, height) - 2.0)
    min_size = float(min(16.0, max_size) if min_object_size is None else min_object_size)
    _check(4 <= min_size <= max_size, f"need 4 <= min object size <= max, got {min_size:g} and {max_size:g}")

    spec = _Spec(width, height, names, min_objects, max_objects, min_size, max_size,
                 float(max_occlusion), int(min_visible_pixels), float(polygon_fraction), seed, style)
    cat_ids = tuple(i + 1 if contiguous_ids else 2 * i + 1 for i in range(len(names)))
    categories = [{"id": c, "name": n, "supercategory": "shape"} for c, n in zip(cat_ids, names)]
    weights = class_weights(len(names), long_tail)

    out = Path(out_dir)
    images_dir = out / "images"
    semantic_dir = out / "semantic"
    images_dir.mkdir(parents=True, exist_ok=True)
    if semantic:
        semantic_dir.mkdir(exist_ok=True)
    params = ([cv2.IMWRITE_PNG_COMPRESSION, 1] if image_format == "png" else [cv2.IMWRITE_JPEG_QUALITY, 95])
    info = {
        "description": "vision procedural shapes",
        "seed": seed, "image_size": [width, height], "long_tail": long_tail, "balanced_val": balanced_val,
        "one_class_per_image": one_class_per_image, "max_occlusion": max_occlusion,
    }
    if style != "textured":
        info["style"] = style

    summary: dict[str, Any] = {
        "out_dir": str(out), "images_dir": str(images_dir),
        "semantic_dir": str(semantic_dir) if semantic else None,
        "categories": categories, "num_images": {}, "num_annotations": {}, "counts": {},
    }
    image_id, ann_id = 1, 1
    for split, n in (("train", num_train), ("val", num_val)):
        split_weights = np.ones(len(names)) if split == "val" and balanced_val else weights
        plan = _labels_per_image(spec, split, n, split_weights, one_class_per_image, empty_fraction)
        ann_rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split], 2]))
        images, annotations = [], []
        for index, labels in enumerate(plan):
            img, idmap, instances = _render(spec, split, index, labels)
            stem = f"{split}_{index:06d}"
            file_name = f"{stem}.{image_format}"
            _write_image(images_dir / file_name, img, params)
            if semantic:
                sem = _semantic(idmap, instances, semantic_ignore_width)
                _write_image(semantic_dir / f"{stem}.png", sem, [cv2.IMWRITE_PNG_COMPRESSION, 1])
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            anns = _annotations(ann_rng, idmap, instances, cat_ids, image_id, ann_id, polygon_fraction)
            annotations.extend(anns)
            image_id += 1
            ann_id += len(anns)
        coco = {"info": info, "licenses": [], "images": images, "annotations": annotations,
                "categories": categories}
        path = out / f"{split}.json"
        path.write_text(json.dumps(coco, separators=(",", ":")))
        per_class = dict.fromkeys(names, 0)
        for a in annotations:
            per_class[names[cat_ids.index(a["category_id"])]] += 1
        summary[split] = str(path)
        summary["num_images"][split] = n
        summary["num_annotations"][split] = len(annotations)
        summary["counts"][split] = per_class
    return summary

