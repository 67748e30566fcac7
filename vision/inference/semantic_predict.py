"""Semantic segmentation over a folder: a class-index PNG per image and, if asked, a colour overlay.

Images are decoded in worker processes and batched by the detection predictor's own machinery; each
finished image is written right away (``masks/<relative path>.png``) and logged to
``predictions.partial.jsonl``, so memory stays flat and a re-run with the same ``--out`` skips what is
done.  ``predictions.json`` lists every image with its mask file and the share of pixels per class.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from vision.inference.predictor import (
    PARTIAL_NAME,
    ImageFiles,
    Predictor,
    _atomic_json,
    _keep_lists,
    _read_partial,
    predict_batches,
)

log = logging.getLogger(__name__)

# class 0 (background) is left undrawn; the rest cycle through a palette as the detection drawings do
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


@dataclass
class SemanticSummary:
    done: int = 0
    resumed: int = 0
    skipped: list[str] = field(default_factory=list)


def overlay(image: np.ndarray, sem_seg: torch.Tensor | np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """HxWx3 uint8 RGB with each foreground class blended in its colour (torchvision's mask drawing)."""
    from torchvision.utils import draw_segmentation_masks

    sem = torch.as_tensor(sem_seg)
    classes = list(range(1, num_classes))
    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not classes:
        return image
    masks = torch.stack([sem == c for c in classes])
    colors = [_PALETTE[(c - 1) % len(_PALETTE)] for c in classes]
    return draw_segmentation_masks(canvas, masks, alpha=alpha, colors=colors).permute(1, 2, 0).numpy()


def write_mask(sem_seg: torch.Tensor | np.ndarray, path: Path) -> None:
    """A lossless single-channel PNG (uint16 when there are more than 256 classes)."""
    sem = np.asarray(torch.as_tensor(sem_seg).cpu().numpy())
    sem = sem.astype(np.uint8) if sem.max(initial=0) < 256 else sem.astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), sem):
        raise OSError(f"{path}: could not write mask")


def _relative(path: str, root: Path | None) -> Path:
    if root is not None:
        try:
            return Path(path).resolve().relative_to(root.resolve())
        except ValueError:
            pass
    return Path(Path(path).name)


def predict_semantic_paths(
    predictor: Predictor,
    paths: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    batch_size: int = 2,
    num_workers: int = 2,
    save_images: bool = False,
    progress: bool = True,
) -> SemanticSummary:
    """Class-index PNGs (and overlays) for every path not already done in ``out_dir``."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ["background", *predictor.categories.names]
    partial_path = out / PARTIAL_NAME
    done = _read_partial(partial_path)
    root_path = Path(root) if root is not None and Path(root).is_dir() else None
    rels = [_relative(p, root_path) for p in paths]
    todo = [i for i, r in enumerate(rels) if r.as_posix() not in done]
    summary = SemanticSummary(resumed=len(paths) - len(todo))
    loader = DataLoader(
        ImageFiles([paths[i] for i in todo]), batch_size=batch_size, num_workers=num_workers, collate_fn=_keep_lists
    )
    with open(partial_path, "a") as partial, tqdm(
        total=len(todo), desc="predict", unit="img", disable=not progress, dynamic_ncols=True
    ) as bar:
        for predicted, batch_len in predict_batches(predictor, loader, summary.skipped):
            for i, img, pred in predicted:
                rel = rels[todo[i]]
                sem = pred["sem_seg"]
                mask_rel = Path("masks") / rel.with_suffix(".png")
                write_mask(sem, out / mask_rel)
                if save_images:
                    drawn = overlay(img.permute(1, 2, 0).numpy(), sem, len(names))
                    target = out / "images" / rel.with_suffix(".png")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(target), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
                counts = torch.bincount(sem.reshape(-1).long(), minlength=len(names))[: len(names)]
                entry = {
                    "image": {"file_name": rel.as_posix(), "width": int(img.shape[2]), "height": int(img.shape[1])},
                    "mask": mask_rel.as_posix(),
                    "pixels": {n: round(float(c) / max(1, sem.numel()), 6) for n, c in zip(names, counts.tolist())},
                }
                partial.write(json.dumps(entry) + "\n")
                summary.done += 1
            partial.flush()
            bar.update(batch_len)
    entries = sorted(_read_partial(partial_path).values(), key=lambda e: e["image"]["file_name"])
    _atomic_json(out / "predictions.json", {"classes": names, "images": entries})
    return summary


def is_semantic(weights: str, config: str | None = None, overrides: Sequence[str] = ()) -> bool:
    """Whether ``vision predict`` was given a semantic_fpn model (by its checkpoint or its --config)."""
    from vision.config import load_config
    from vision.models.weights import load_checkpoint

    if config is not None:
        return load_config(config, list(overrides)).model.arch == "semantic_fpn"
    ckpt = load_checkpoint(weights)
    arch = ckpt.get("arch") or (ckpt.get("config") or {}).get("model", {}).get("arch")
    return arch == "semantic_fpn"


def run_semantic_predict(args: Any) -> int:
    """``vision predict`` for a semantic_fpn model: masks/*.png, predictions.json, images/ overlays."""
    from vision.commands.predict import engine_options
    from vision.data.image_io import list_images
    from vision.errors import VisionError
    from vision.inference.predictor import load_model_for_inference

    if len(args.weights) > 1:
        raise VisionError("several --weights: ensembling is for detectors; give one semantic segmentation model")
    paths = list_images(args.source)
    if not paths:
        raise VisionError(f"{args.source}: no images found")
    model, _, categories = load_model_for_inference(args.weights[0], args.config, args.overrides)
    predictor = Predictor(model, categories, device=args.device, amp=args.amp, engine=engine_options(args))
    out = Path(args.out)
    root = Path(args.source) if Path(args.source).is_dir() else None
    summary = predict_semantic_paths(
        predictor, paths, out, root=root, batch_size=args.batch_size, num_workers=args.workers,
        save_images=args.save_images,
    )
    for line in summary.skipped:
        print(f"skipped {line}")
    print(
        f"segmented {summary.done} images ({summary.resumed} already done, {len(summary.skipped)} unreadable "
        f"skipped) -> {out / 'masks'}, {out / 'predictions.json'}"
    )
    return 0
