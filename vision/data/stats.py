"""The facts a recipe depends on, read from its data before any training: ``vision inspect``.

The splits are read by the same readers training uses (``build_datasets``, ``build_classification_sets``),
so the report sees what training sees, and image files are opened only for their headers.  Box sizes
are given as sqrt(area) in the pixels the model sees, after torchvision's resize (the shorter side to
``model.min_size``, the longer at most ``model.max_size``), and set against the anchor sizes of the
recipe: a box no anchor shape overlaps by IoU 0.5 (centred on it, the best case) is one the detector
learns from a poor match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from vision.config import Config
from vision.errors import ConfigError, ImageReadError

DETECTION_ARCHS = ("retinanet", "faster_rcnn", "mask_rcnn")
PERCENTILES = (0, 1, 5, 25, 50, 75, 95, 99, 100)
ANCHOR_IOU = 0.5  # torchvision RetinaNet's foreground threshold; the RPN (0.7) also keeps each box's best anchor
IMBALANCE_WARN = 10.0
DUPLICATE_IOU = 0.9
SHOWN = 10  # problems listed by name; the rest are counted


def _summary(values: Sequence[float]) -> dict[str, float] | None:
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return None
    return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {f"p{p}": round(float(np.percentile(values, p)), 2) for p in PERCENTILES}


def resize_scale(width: int, height: int, min_size: int, max_size: int) -> float:
    """torchvision's ``GeneralizedRCNNTransform`` scale factor for one image."""
    return min(min_size / min(width, height), max_size / max(width, height))


def anchor_shapes(cfg: Config) -> tuple[list[int], list[float]] | None:
    """The recipe's anchor sizes (all levels) and aspect ratios; None for models without anchors."""
    if cfg.model.arch not in DETECTION_ARCHS:
        return None
    from vision.models.detection import RCNN_ANCHOR_SIZES, RETINANET_ANCHOR_SIZES

    default = RETINANET_ANCHOR_SIZES if cfg.model.arch == "retinanet" else RCNN_ANCHOR_SIZES
    sizes = cfg.model.anchor_sizes if cfg.model.anchor_sizes is not None else default
    return sorted({int(s) for level in sizes for s in level}), [float(r) for r in cfg.model.aspect_ratios]


def best_anchor_iou(wh: np.ndarray, sizes: Sequence[int], ratios: Sequence[float]) -> np.ndarray:
    """[N] IoU of each (w, h) box with the anchor shape that fits it best, both centred at one point.

    Anchor shapes are torchvision's ``AnchorGenerator``'s: width s / sqrt(r), height s * sqrt(r).
    """
    s = np.asarray(sizes, np.float64)[:, None]
    r = np.sqrt(np.asarray(ratios, np.float64))[None, :]
    aw, ah = (s / r).reshape(-1), (s * r).reshape(-1)
    w, h = wh[:, :1], wh[:, 1:]
    inter = np.minimum(w, aw) * np.minimum(h, ah)
    iou = inter / (w * h + aw * ah - inter)
    return iou.max(1) if iou.size else np.zeros(len(wh))


def _duplicates(boxes: np.ndarray, labels: np.ndarray) -> int:
    """Same-class box pairs overlapping at IoU > 0.9: usually one object annotated twice."""
    if len(boxes) < 2:
        return 0
    import torch
    from torchvision.ops import box_iou

    iou = box_iou(torch.from_numpy(boxes.astype(np.float32)), torch.from_numpy(boxes.astype(np.float32))).numpy()
    same = labels[:, None] == labels[None, :]
    return int(np.triu((iou > DUPLICATE_IOU) & same, k=1).sum())


def _check_headers(paths: Sequence[str]) -> tuple[dict[str, tuple[int, int]], list[str]]:
    from vision.data.image_io import read_image_header

    sizes, unreadable = {}, []
    for path in dict.fromkeys(paths):
        try:
            sizes[path] = read_image_header(path)
        except ImageReadError as e:
            unreadable.append(str(e))
    return sizes, unreadable


def _class_table(names: Sequence[str], labels: np.ndarray, images_of: list[np.ndarray]) -> dict[str, Any]:
    counts = np.bincount(labels, minlength=len(names))[: len(names)]
    images = np.zeros(len(names), np.int64)
    for present in images_of:
        images[np.unique(present)] += 1
    present = counts[counts > 0]
    ratio = float(present.max() / present.min()) if present.size else None
    return {
        "counts": {n: int(c) for n, c in zip(names, counts)},
        "images": {n: int(c) for n, c in zip(names, images)},
        "absent": [n for n, c in zip(names, counts) if c == 0],
        "imbalance": round(ratio, 2) if ratio is not None else None,
    }


def detection_split_stats(det_set: Any, cfg: Config) -> dict[str, Any]:
    """One detection split: images, sizes, objects per image, classes, box sizes, anchor coverage, problems."""
    sizes, unreadable = _check_headers([r.path for r in det_set.records])
    records = [r for r in det_set.records if r.path in sizes]
    mismatched = [
        f"{r.path}: annotated {r.width}x{r.height}, file is {sizes[r.path][0]}x{sizes[r.path][1]}"
        for r in records if sizes[r.path] != (r.width, r.height)
    ]
    names = list(det_set.categories.names)
    objects = [r.labels[~r.iscrowd] for r in records]
    per_image = np.array([len(o) for o in objects], np.int64)
    labels = np.concatenate(objects) - 1 if objects else np.zeros(0, np.int64)
    m = cfg.model
    scales = sorted({int(s) for s in m.min_size})
    eval_min = int(m.min_size[-1])  # torchvision evaluates at the last min_size
    wh, wh_train = [], []
    for r in records:
        keep = ~r.iscrowd
        b = r.boxes[keep].astype(np.float64)
        box_wh = np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
        wh.append(box_wh * resize_scale(r.width, r.height, eval_min, m.max_size))
        wh_train += [box_wh * resize_scale(r.width, r.height, s, m.max_size) for s in scales]
    wh_all = np.concatenate(wh) if wh else np.zeros((0, 2))
    side = np.sqrt(wh_all.prod(1))
    out: dict[str, Any] = {
        "source": det_set.source,
        "images": len(records),
        "width": _summary([r.width for r in records]),
        "height": _summary([r.height for r in records]),
        "objects": int(per_image.sum()),
        "objects_per_image": {
            "mean": round(float(per_image.mean()), 2) if per_image.size else None,
            "median": float(np.median(per_image)) if per_image.size else None,
            "max": int(per_image.max()) if per_image.size else None,
            "images_with_none": int((per_image == 0).sum()),
        },
        "crowd": int(sum(int(r.iscrowd.sum()) for r in records)),
        "difficult": int(sum(int(r.difficult.sum()) for r in records)),
        "classes": _class_table(names, labels, [o - 1 for o in objects]),
        "box_side_px": {
            "resize": {"min_size": list(m.min_size), "max_size": m.max_size, "evaluated_at": eval_min},
            "original": _percentiles(np.sqrt(np.concatenate(
                [(r.boxes[~r.iscrowd, 2:] - r.boxes[~r.iscrowd, :2]).prod(1) for r in records]
            ))) if records else {},
            "resized": _percentiles(side),
            "aspect_h_over_w": _percentiles(wh_all[:, 1] / np.maximum(wh_all[:, 0], 1e-6)) if len(wh_all) else {},
        },
        "unreadable_images": unreadable,
        "size_mismatches": mismatched,
        "dropped_boxes": list(det_set.dropped),
        "duplicate_boxes": sum(_duplicates(r.boxes[~r.iscrowd], r.labels[~r.iscrowd]) for r in records),
        "_box_sides": side,  # for the plot; not written to JSON
        "_sizes": np.array([[r.width, r.height] for r in records], np.float64).reshape(-1, 2),
        "_per_image": per_image,
    }
    anchors = anchor_shapes(cfg)
    if anchors is not None and wh_train:
        a_sizes, ratios = anchors
        train_wh = np.concatenate(wh_train)
        best = best_anchor_iou(train_wh, a_sizes, ratios)
        train_side = np.sqrt(train_wh.prod(1))
        poor = best < ANCHOR_IOU
        out["anchors"] = {
            "sizes": a_sizes,
            "aspect_ratios": ratios,
            "iou": ANCHOR_IOU,
            "at_min_sizes": scales,
            "boxes": len(best),
            "covered": round(float(1 - poor.mean()), 4) if len(best) else None,
            "smaller_than_smallest": int((poor & (train_side < min(a_sizes))).sum()),
            "larger_than_largest": int((poor & (train_side > max(a_sizes))).sum()),
            "other_shape": int((poor & (train_side >= min(a_sizes)) & (train_side <= max(a_sizes))).sum()),
        }
    return out


def classification_split_stats(cls_set: Any) -> dict[str, Any]:
    """One classification split: samples, distinct images and their sizes, classes, crop sizes."""
    paths = [s.path for s in cls_set.samples]
    sizes, unreadable = _check_headers(paths)
    samples = [s for s in cls_set.samples if s.path in sizes]
    names = list(cls_set.categories.names)
    labels = np.array([lab for s in samples for lab in s.labels], np.int64)
    dims = np.array(list(sizes.values()), np.float64).reshape(-1, 2)
    crops = [s.box for s in samples if s.box is not None]
    side = np.sqrt(np.array([(b[2] - b[0]) * (b[3] - b[1]) for b in crops], np.float64))
    return {
        "source": cls_set.source,
        "samples": len(samples),
        "images": len(sizes),
        "width": _summary(dims[:, 0]),
        "height": _summary(dims[:, 1]),
        "classes": _class_table(names, labels, [np.asarray(s.labels, np.int64) for s in samples]),
        "crop_side_px": _percentiles(side),
        "unreadable_images": unreadable,
        "_sizes": dims,
        "_box_sides": side,
    }


def _warnings(split: str, s: dict[str, Any], cfg: Config, detection: bool) -> list[str]:
    w = []
    if s["unreadable_images"]:
        w.append(f"{split}: {len(s['unreadable_images'])} unreadable images (training skips them), "
                 f"e.g. {s['unreadable_images'][0]}")
    if s.get("size_mismatches"):
        w.append(f"{split}: {len(s['size_mismatches'])} images whose annotated size differs from the file, "
                 f"e.g. {s['size_mismatches'][0]}")
    if s.get("dropped_boxes"):
        w.append(f"{split}: {len(s['dropped_boxes'])} zero-area boxes dropped by the reader, e.g. {s['dropped_boxes'][0]}")
    if s.get("duplicate_boxes"):
        w.append(f"{split}: {s['duplicate_boxes']} same-class box pairs overlap at IoU > {DUPLICATE_IOU} "
                 "(objects annotated twice?)")
    c = s["classes"]
    if c["absent"]:
        w.append(f"{split}: classes with no {'objects' if detection else 'samples'}: {', '.join(c['absent'])}")
    if split == "train" and c["imbalance"] is not None and c["imbalance"] > IMBALANCE_WARN:
        counts = {n: v for n, v in c["counts"].items() if v > 0}
        top, low = max(counts, key=counts.get), min(counts, key=counts.get)
        hint = ("data.sampler=repeat_factor (or class_balanced)" if detection else "data.sampler=class_balanced")
        now = f"data.sampler is already {cfg.data.sampler}" if cfg.data.sampler != "uniform" else f"consider {hint}"
        w.append(f"train: class imbalance {c['imbalance']:.1f}:1 ({top} {counts[top]} vs {low} {counts[low]}); {now}")
    a = s.get("anchors")
    if a and a["covered"] is not None and a["covered"] < 0.99:
        w.append(
            f"{split}: {1 - a['covered']:.1%} of boxes (at min_size {a['at_min_sizes']}) match no anchor shape at "
            f"IoU {a['iou']}: {a['smaller_than_smallest']} smaller than the smallest anchor ({a['sizes'][0]} px), "
            f"{a['larger_than_largest']} larger than the largest ({a['sizes'][-1]} px), {a['other_shape']} of "
            f"another shape; consider model.anchor_sizes / model.aspect_ratios / model.min_size"
        )
    per = s.get("objects_per_image")
    if per and s["images"] and per["images_with_none"] > 0.2 * s["images"]:
        w.append(f"{split}: {per['images_with_none']} of {s['images']} images have no objects")
    return w


def inspect_data(cfg: Config) -> dict[str, Any]:
    """The report of a config's data: ``{"name", "arch", "splits": {train, val}, "warnings": [...]}``."""
    arch = cfg.model.arch
    if arch == "classifier":
        from vision.data.classification import build_classification_sets

        train, val = build_classification_sets(cfg, check_images=False)
        stats = classification_split_stats
    else:
        from vision.data.build import READERS, build_datasets

        for split in (cfg.data.train, cfg.data.val):
            if split.ann and split.format not in READERS:
                raise ConfigError(
                    f"vision inspect reads {', '.join(READERS)} splits for a {arch} recipe, not '{split.format}'"
                )
        train, val = build_datasets(cfg, check_images=False)

        def stats(s: Any) -> dict[str, Any]:
            return detection_split_stats(s, cfg)

    splits = {"train": stats(train)}
    if val is not train:
        splits["val"] = stats(val)
    detection = arch != "classifier"
    warnings = [msg for name, s in splits.items() for msg in _warnings(name, s, cfg, detection)]
    return {"name": cfg.name, "arch": arch, "class_names": list(train.categories.names), "splits": splits,
            "warnings": warnings}


def public(report: dict[str, Any]) -> dict[str, Any]:
    """The report without its plotting arrays, problem lists cut to their first few, for JSON."""
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if not str(k).startswith("_")}
        if isinstance(value, list) and len(value) > SHOWN and all(isinstance(v, str) for v in value):
            return [*value[:SHOWN], f"... and {len(value) - SHOWN} more"]
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return clean(report)
