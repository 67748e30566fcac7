"""What each task writes from a folder run (``runner.py``): one log entry per image, then its files.

- detection (boxes, instance masks): ``predictions.json`` (COCO results, the data set's own category
  ids), ``images.json`` (COCO ``images`` + ``categories``, so ``vision eval-dets`` can match the images to
  a ground truth by name), optionally ``predictions.csv`` and drawn images under ``images/``;
- semantic segmentation: a class-index PNG per image under ``masks/`` (written as each image finishes),
  optional colour overlays under ``images/``, and ``predictions.json`` with every image's mask file and the
  share of its pixels per class;
- classification: ``predictions.json`` (top-k classes and probabilities per file) and ``predictions.csv``.

Outputs are written atomically and streamed from the logs, so only the images list is held in memory.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from vision.atomic import atomic_write
from vision.data.coco_results import prediction_to_results
from vision.data.records import Categories

Expand = Callable[[list[dict[str, Any]], dict[str, Any]], list[dict[str, Any]]]


@dataclass
class Drawing:
    """Drawn images: where they go and the score a detection needs to be drawn."""

    folder: Path
    score_thresh: float | None = None  # None: the drawing's default (``draw.DRAW_THRESH``)


def _image_png(folder: Path, name: str) -> Path:
    return folder / Path(name).with_suffix(".png")


def _write_image(path: Path, rgb_or_gray: np.ndarray) -> None:
    """Encoded by the file's suffix (PNG where OpenCV knows no such format), written atomically."""
    image = cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR) if rgb_or_gray.ndim == 3 else rgb_or_gray
    suffix = path.suffix.lower() if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") else ".png"
    ok, buf = cv2.imencode(suffix, image)
    if not ok:
        raise OSError(f"{path}: could not encode the image")
    with atomic_write(path) as f:
        f.write(buf.tobytes())


class DetectionWriter:
    """COCO results per image; ``expand`` adds parent-class copies, ``categories_out`` then lists them."""

    def __init__(
        self,
        categories: Categories,
        *,
        expand: Expand | None = None,
        categories_out: list[dict[str, Any]] | None = None,
        write_csv: bool = False,
        drawing: Drawing | None = None,
    ):
        self.categories = categories
        self.expand = expand
        self.categories_out = list(categories_out) if categories_out is not None else categories.to_coco()
        self.write_csv = write_csv
        self.drawing = drawing
        self.outputs = ["predictions.json", "images.json"] + (["predictions.csv"] if write_csv else [])

    def entry(self, name: str, image: torch.Tensor | None, size: tuple[int, int], pred: dict[str, Any]) -> dict:
        results = prediction_to_results(0, pred, self.categories)
        if self.expand is not None:
            results = self.expand(results, {"id": 0, "width": size[1], "height": size[0]})
        for r in results:
            del r["image_id"]  # given at the merge, where every image's id is known
        if self.drawing is not None and image is not None:
            from vision.inference.draw import draw_prediction

            drawn = draw_prediction(image.permute(1, 2, 0).numpy(), pred, self.categories, self.drawing.score_thresh)
            _write_image(self.drawing.folder / name, drawn)
        return {"results": results}

    def count(self, entry: dict[str, Any]) -> int:
        return len(entry["results"])

    def finish(self, out_dir: Path, images: list[dict[str, Any]], entries: Iterable[dict[str, Any]]) -> None:
        name_of = {int(c["id"]): str(c.get("name", c["id"])) for c in self.categories_out}
        with contextlib.ExitStack() as stack:
            pf = stack.enter_context(atomic_write(out_dir / "predictions.json", "w"))
            rows = None
            if self.write_csv:
                rows = csv.writer(stack.enter_context(atomic_write(out_dir / "predictions.csv", "w", newline="")))
                rows.writerow(["file_name", "class", "score", "x1", "y1", "x2", "y2"])
            pf.write("[")
            first = True
            for entry in entries:
                image = entry["image"]
                for r in entry["results"]:
                    r = {"image_id": image["id"], **r}
                    pf.write(("" if first else ", ") + json.dumps(r))
                    first = False
                    if rows is not None:
                        x, y, w, h = r["bbox"]
                        rows.writerow([
                            image["file_name"], name_of.get(int(r["category_id"]), r["category_id"]),
                            f"{r['score']:.6g}", f"{x:.2f}", f"{y:.2f}", f"{x + w:.2f}", f"{y + h:.2f}",
                        ])
            pf.write("]")
        with atomic_write(out_dir / "images.json", "w") as f:
            f.write(json.dumps({"images": images, "categories": self.categories_out}))


# class 0 (background) is left undrawn; the rest cycle through a palette as the detection drawings do
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


def overlay(image: np.ndarray, sem_seg: torch.Tensor | np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """HxWx3 uint8 RGB with each foreground class blended in its colour (torchvision's mask drawing)."""
    from torchvision.utils import draw_segmentation_masks

    sem = torch.as_tensor(sem_seg)
    classes = list(range(1, num_classes))
    if not classes:
        return image
    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    masks = torch.stack([sem == c for c in classes])
    colors = [_PALETTE[(c - 1) % len(_PALETTE)] for c in classes]
    return draw_segmentation_masks(canvas, masks, alpha=alpha, colors=colors).permute(1, 2, 0).numpy()


def class_map_png(sem_seg: torch.Tensor | np.ndarray) -> np.ndarray:
    """A lossless single-channel image (uint16 when there are more than 256 classes)."""
    sem = np.asarray(torch.as_tensor(sem_seg).cpu().numpy())
    return sem.astype(np.uint8) if sem.max(initial=0) < 256 else sem.astype(np.uint16)


class SemanticWriter:
    """A class-index PNG per image (and an overlay), and the share of pixels per class."""

    def __init__(self, out_dir: Path, categories: Categories, *, drawing: Drawing | None = None):
        self.out_dir = Path(out_dir)
        self.names = ["background", *categories.names]
        self.drawing = drawing
        self.outputs = ["masks/", "predictions.json"]

    def entry(self, name: str, image: torch.Tensor | None, size: tuple[int, int], pred: dict[str, Any]) -> dict:
        sem = pred["sem_seg"]
        mask_rel = Path("masks") / Path(name).with_suffix(".png")
        _write_image(self.out_dir / mask_rel, class_map_png(sem))
        if self.drawing is not None and image is not None:
            drawn = overlay(image.permute(1, 2, 0).numpy(), sem, len(self.names))
            _write_image(_image_png(self.drawing.folder, name), drawn)
        counts = torch.bincount(sem.reshape(-1).long(), minlength=len(self.names))[: len(self.names)]
        total = max(1, sem.numel())
        return {
            "mask": mask_rel.as_posix(),
            "pixels": {n: round(float(c) / total, 6) for n, c in zip(self.names, counts.tolist())},
        }

    def count(self, entry: dict[str, Any]) -> int:
        return 0

    def finish(self, out_dir: Path, images: list[dict[str, Any]], entries: Iterable[dict[str, Any]]) -> None:
        listed = sorted(entries, key=lambda e: e["image"]["id"])  # one small entry per image
        with atomic_write(out_dir / "predictions.json", "w") as f:
            f.write(json.dumps({"classes": self.names, "images": listed}))


class ClassificationWriter:
    """Top-k classes and probabilities per image, as JSON and as a one-row-per-image CSV."""

    def __init__(self, categories: Categories):
        self.names = list(categories.names)
        self.outputs = ["predictions.json", "predictions.csv"]

    def entry(self, name: str, image: torch.Tensor | None, size: tuple[int, int], pred: dict[str, Any]) -> dict:
        scores = pred["scores"].float().cpu()
        return {"top_k": [{"class": self.names[int(i)], "score": float(scores[int(i)])} for i in pred["labels"].tolist()]}

    def count(self, entry: dict[str, Any]) -> int:
        return 0

    def finish(self, out_dir: Path, images: list[dict[str, Any]], entries: Iterable[dict[str, Any]]) -> None:
        listed = sorted(
            ({"id": e["image"]["id"], "file_name": e["image"]["file_name"], "top_k": e["top_k"]} for e in entries),
            key=lambda e: e["id"],
        )
        with atomic_write(out_dir / "predictions.json", "w") as f:
            f.write(json.dumps(listed, indent=1))
        with atomic_write(out_dir / "predictions.csv", "w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(["file", "class", "score"])
            for r in listed:
                rows.writerow([r["file_name"], r["top_k"][0]["class"], f"{r['top_k'][0]['score']:.6f}"])
