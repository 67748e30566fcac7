"""Matching the images of a results file to a ground truth's by file name.

``vision predict`` numbers the images it reads 1..N and names them in ``images.json`` by their path
relative to ``--source``; a ground truth numbers the same files its own way and may name them with a
folder in front (``JPEGImages/x.jpg``).  A predicted name matches the ground-truth name that equals
it, else the one it is a path suffix of, else the one with the same base name; where several share a
base name, the one sharing the most trailing path components wins, and a tie is an error.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from vision.errors import DataError


@dataclass
class ImageMatch:
    """Results-file image id -> ground-truth image id, and the predicted names with no ground truth."""

    ids: dict[int, int] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


def _parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in PurePosixPath(str(name).replace("\\", "/")).parts if p not in ("", ".", "/"))


def _shared_tail(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def match_images(gt_images: Sequence[dict[str, Any]], predicted: Sequence[dict[str, Any]], source: str) -> ImageMatch:
    """Matches ``predicted`` (``images.json`` entries: id, file_name) to ``gt_images`` by file name."""
    by_base: dict[str, list[tuple[tuple[str, ...], int]]] = defaultdict(list)
    for img in gt_images:
        parts = _parts(img.get("file_name", ""))
        if parts:
            by_base[parts[-1]].append((parts, int(img["id"])))
    match = ImageMatch()
    for k, img in enumerate(predicted):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise DataError(source, f"image {k} needs an id and a file_name")
        parts = _parts(img["file_name"])
        candidates = by_base.get(parts[-1], []) if parts else []
        if not candidates:
            match.unmatched.append(str(img["file_name"]))
            continue
        scored = sorted(((_shared_tail(parts, c), gid) for c, gid in candidates), reverse=True)
        if len(scored) > 1 and scored[0][0] == scored[1][0]:
            raise DataError(
                source, f"image '{img['file_name']}' matches several ground-truth images by name; "
                "predict from the folder the ground truth's file names are relative to"
            )
        match.ids[int(img["id"])] = scored[0][1]
    return match


def restrict_ground_truth(gt: dict[str, Any], image_ids: set[int]) -> dict[str, Any]:
    """``gt`` with only the images in ``image_ids`` and their annotations."""
    return {
        **gt,
        "images": [img for img in gt.get("images", []) if img["id"] in image_ids],
        "annotations": [a for a in gt.get("annotations", []) if a.get("image_id") in image_ids],
    }
