"""Inference over many images: decode in worker processes, batch, predict, write results as they come.

Memory stays flat however large the folder: images flow through a DataLoader with a bounded prefetch
and each finished image is appended to ``predictions.partial.jsonl`` right away.  That file is also
what makes a run resumable: re-running with the same ``--out`` skips the images already in it.  At the
end ``predictions.json`` (COCO results) and ``images.json`` (COCO ``images``) are written from it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vision.config import Config, config_from_dict, load_config
from vision.data.image_io import read_image
from vision.data.records import Categories
from vision.engine.coco_eval import prediction_to_results
from vision.engine.device import autocast, select_device
from vision.errors import ImageReadError, VisionError

log = logging.getLogger(__name__)

PARTIAL_NAME = "predictions.partial.jsonl"


def categories_from_checkpoint(ckpt: dict[str, Any]) -> Categories:
    """The data set's own category ids where the checkpoint kept them, else 1..K for its class names."""
    cats = ckpt.get("categories")
    if isinstance(cats, dict) and "ids" in cats and "names" in cats:
        return Categories(tuple(int(i) for i in cats["ids"]), tuple(str(n) for n in cats["names"]))
    names = ckpt.get("class_names")
    if not names:
        raise VisionError("checkpoint has no class names; give --config with data.class_names")
    return Categories.from_names(names)


def load_model_for_inference(
    weights: str | os.PathLike, config: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> tuple[torch.nn.Module, Config, Categories]:
    """A model in eval mode from a vision checkpoint (config inside) or a state_dict plus a config."""
    from vision.models import build_model
    from vision.models.weights import load_checkpoint, load_model_weights

    ckpt = load_checkpoint(weights)
    is_vision = isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt
    if config is not None:
        cfg = load_config(config, list(overrides))
    elif is_vision:
        cfg = load_config(None, list(overrides)) if not ckpt["config"] else _with_overrides(ckpt["config"], overrides)
    else:
        raise VisionError(f"{weights}: a plain state_dict needs --config to say which model it is")
    if is_vision:
        categories = categories_from_checkpoint(ckpt)
    elif cfg.data.class_names:
        categories = Categories.from_names(cfg.data.class_names)
    else:
        categories = Categories.from_names([str(i) for i in range(1, cfg.model.num_classes + 1)])
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = len(categories)
    cfg.model.pretrained = None  # the checkpoint supplies every weight
    model = build_model(cfg.model)
    load_model_weights(model, ckpt)
    model.eval()
    return model, cfg, categories


def _with_overrides(cfg_dict: dict[str, Any], overrides: Sequence[str]) -> Config:
    from vision.config import _merge, parse_overrides

    return config_from_dict(_merge(cfg_dict, parse_overrides(list(overrides))))


class ImageFiles(Dataset):
    """Decodes images by path in DataLoader workers; a bad file yields its error instead of pixels."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = read_image(self.paths[index])
        except ImageReadError as e:
            return index, None, str(e)
        return index, torch.from_numpy(image).permute(2, 0, 1), None


def _keep_lists(batch: list) -> list:
    return batch


@dataclass
class PredictSummary:
    done: int = 0
    resumed: int = 0
    skipped: list[str] = field(default_factory=list)
    detections: int = 0


class Predictor:
    """One model, batched inference on uint8 images, predictions in original-image pixels."""

    def __init__(
        self,
        model: torch.nn.Module,
        categories: Categories,
        device: str | torch.device = "auto",
        amp: bool = False,
    ):
        self.device = device if isinstance(device, torch.device) else select_device(device)
        self.model = model.to(self.device).eval()
        self.categories = categories
        self.amp = amp

    @torch.inference_mode()
    def predict(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """uint8 CHW tensors -> torchvision-style predictions (boxes, scores, labels[, masks]) on the CPU."""
        batch = [img.to(self.device, non_blocking=True).float().div_(255.0) for img in images]
        with autocast(self.device, self.amp):
            outputs = self.model(batch)
        return [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]


def _relative_name(path: str, root: Path | None) -> str:
    if root is not None:
        try:
            return Path(path).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return path


def _read_partial(path: Path) -> dict[str, dict[str, Any]]:
    """file_name -> {image, results}, for the images a previous run finished (a torn last line is dropped)."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break
            done[entry["image"]["file_name"]] = entry
    return done


def predict_paths(
    predictor: Predictor,
    paths: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    batch_size: int = 2,
    num_workers: int = 2,
    on_image: Callable[[str, np.ndarray | None, dict[str, torch.Tensor]], None] | None = None,
    progress: bool = True,
) -> PredictSummary:
    """Predicts every path not already done in ``out_dir``; writes predictions.json and images.json."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial_path = out_dir / PARTIAL_NAME
    done = _read_partial(partial_path)
    root_path = Path(root) if root is not None and Path(root).is_dir() else None
    names = [_relative_name(p, root_path) for p in paths]
    next_id = max([e["image"]["id"] for e in done.values()], default=0) + 1
    todo = [i for i, n in enumerate(names) if n not in done]
    summary = PredictSummary(resumed=len(paths) - len(todo))
    loader = DataLoader(
        ImageFiles([paths[i] for i in todo]),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_keep_lists,
        pin_memory=predictor.device.type == "cuda",
    )
    with open(partial_path, "a") as partial, tqdm(
        total=len(todo), desc="predict", unit="img", disable=not progress, dynamic_ncols=True
    ) as bar:
        for batch in loader:
            good = [(i, img) for i, img, err in batch if err is None]
            for _, _, err in batch:
                if err is not None:
                    summary.skipped.append(err)
                    log.warning("skipping unreadable image: %s", err)
            outputs = predictor.predict([img for _, img in good]) if good else []
            for (i, img), pred in zip(good, outputs):
                path, name = paths[todo[i]], names[todo[i]]
                image_entry = {"id": next_id, "file_name": name, "width": int(img.shape[2]), "height": int(img.shape[1])}
                results = prediction_to_results(next_id, pred, predictor.categories)
                partial.write(json.dumps({"image": image_entry, "results": results}) + "\n")
                next_id += 1
                summary.done += 1
                summary.detections += len(results)
                if on_image is not None:
                    on_image(path, img.permute(1, 2, 0).numpy(), pred)
            partial.flush()
            bar.update(len(batch))
    write_outputs(out_dir, predictor.categories)
    return summary


def write_outputs(out_dir: Path, categories: Categories) -> None:
    """predictions.json + images.json from the partial log, each written atomically."""
    entries = list(_read_partial(out_dir / PARTIAL_NAME).values())
    images = sorted((e["image"] for e in entries), key=lambda im: im["id"])
    results = [r for e in sorted(entries, key=lambda e: e["image"]["id"]) for r in e["results"]]
    _atomic_json(out_dir / "predictions.json", results)
    _atomic_json(out_dir / "images.json", {"images": images, "categories": categories.to_coco()})


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)

