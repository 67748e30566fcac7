"""Inference over many images: decode in worker processes, batch, predict, write results as they come.

Memory stays flat however large the folder: images flow through a DataLoader with a bounded prefetch
and each finished image is appended to ``predictions.partial.jsonl`` right away.  That file is also
what makes a run resumable: re-running with the same ``--out`` skips the images already in it.  At the
end ``predictions.json`` (COCO results), ``images.json`` (COCO ``images``) and optionally
``predictions.csv`` are streamed from it.  Under ``torchrun`` each rank takes every world_size-th image
and logs to ``predictions.partial.rank<R>.jsonl``; rank 0 merges the logs.
"""

from __future__ import annotations

import contextlib
import csv
import heapq
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vision.atomic import atomic_write
from vision.config import Config, config_from_dict, load_config
from vision.data.image_io import read_image
from vision.data.records import Categories
from vision.errors import ImageReadError, VisionError
from vision.inference.engine import (
    EngineOptions,
    aspect_groups,
    optimize_for_inference,
    precision_context,
    precision_dtype,
)
from vision.metrics.coco import prediction_to_results
from vision.runtime.device import select_device

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
    log.warning(
        "checkpoint keeps class names but not their category ids (an older vision checkpoint): "
        "ids 1..%d are assumed", len(names),
    )
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


def predict_batches(
    predictor: Any, loader: Iterable[list], skipped: list[str]
) -> Iterator[tuple[list[tuple[int, torch.Tensor, dict[str, torch.Tensor]]], int]]:
    """For each batch of ``ImageFiles`` items: (index, image, prediction) of its readable images, and
    the batch's size.  Unreadable files are logged and their errors appended to ``skipped``."""
    for batch in loader:
        good = [(i, img) for i, img, err in batch if err is None]
        for _, _, err in batch:
            if err is not None:
                skipped.append(err)
                log.warning("skipping unreadable image: %s", err)
        outputs = predictor.predict([img for _, img in good]) if good else []
        yield [(i, img, pred) for (i, img), pred in zip(good, outputs)], len(batch)


@dataclass
class PredictSummary:
    done: int = 0
    resumed: int = 0
    skipped: list[str] = field(default_factory=list)
    detections: int = 0


class Predictor:
    """One model, batched inference on uint8 images, predictions in original-image pixels.

    ``engine`` says how the model is run (``inference.py``): by default batch norms folded,
    ``channels_last`` and one image per forward pass on a CPU, float32.  ``amp`` is the older
    switch for reduced precision (bfloat16 on CPU, float16 on CUDA); ``engine.precision`` wins
    where both are given.  ``EngineOptions.plain()`` runs the model exactly as trained.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        categories: Categories,
        device: str | torch.device = "auto",
        amp: bool = False,
        engine: EngineOptions | None = None,
    ):
        self.device = device if isinstance(device, torch.device) else select_device(device)
        engine = EngineOptions() if engine is None else engine
        if amp and engine.precision == "fp32":
            engine = replace(engine, precision="fp16" if self.device.type == "cuda" else "bf16")
        precision_dtype(engine.precision, self.device)  # an unsupported precision fails here, not mid-run
        self.engine = engine
        self.model = optimize_for_inference(model.to(self.device), engine)
        self.categories = categories

    @torch.inference_mode()
    def predict(self, images: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """uint8 CHW tensors -> torchvision-style predictions (boxes, scores, labels[, masks]) on the CPU."""
        outputs: list[dict[str, torch.Tensor] | None] = [None] * len(images)
        for group in aspect_groups(images, self.engine.images_per_pass(self.device)):
            batch = [images[i].to(self.device, non_blocking=True).float().div_(255.0) for i in group]
            with precision_context(self.engine.precision, self.device):
                preds = self.model(batch)
            for i, o in zip(group, preds):
                outputs[i] = _drop_background(
                    {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()}
                )
        return outputs  # type: ignore[return-value]


def _drop_background(pred: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """RetinaNet scores label 0 like any class; 0 is background in our labels, so it is never an answer."""
    if "labels" not in pred:  # not a detector's output
        return pred
    keep = pred["labels"] > 0
    if bool(keep.all()):
        return pred
    return {k: v[keep] if v.ndim and len(v) == len(keep) else v for k, v in pred.items()}


def _relative_name(path: str, root: Path | None) -> str:
    if root is not None:
        try:
            return Path(path).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return path


def _partial_files(out_dir: Path) -> list[Path]:
    """Every rank's partial log (one file when run as one process), oldest layout first."""
    return sorted(out_dir.glob("predictions.partial*.jsonl"))


def _partial_path(out_dir: Path, rank: int, world_size: int) -> Path:
    return out_dir / (PARTIAL_NAME if world_size == 1 else f"predictions.partial.rank{rank}.jsonl")


def _iter_file(path: Path) -> Iterator[dict[str, Any]]:
    """Entries of one partial log; a torn line (a run killed mid-write) is skipped."""
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "image" in entry:
                yield entry


def _read_partial(path: Path) -> dict[str, dict[str, Any]]:
    """file_name -> {image, results} of one partial log, held in memory (for small logs only)."""
    return {e["image"]["file_name"]: e for e in _iter_file(path)} if path.exists() else {}


def _done_images(out_dir: Path) -> dict[str, int]:
    """file_name -> image id for the images a previous run finished (only names and ids are kept)."""
    done: dict[str, int] = {}
    for path in _partial_files(out_dir):
        for entry in _iter_file(path):
            name, image_id = entry["image"]["file_name"], int(entry["image"]["id"])
            done[name] = min(image_id, done.get(name, image_id))
    return done


def _open_for_append(path: Path):
    """Append mode, starting on a fresh line if a killed run left half a line behind."""
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            with open(path, "a") as f:
                f.write("\n")
    return open(path, "a")


Expand = Callable[[list[dict[str, Any]], dict[str, Any]], list[dict[str, Any]]]


def hierarchy_expander(hierarchy, categories: Categories, merge: str | None = "nms") -> tuple[Expand, list[dict]]:
    """Per-image parent-class expansion for ``predict_paths``, and the categories it writes (ancestors added)."""
    from vision.ensemble import expand_detections, extend_categories

    base = categories.to_coco()
    cats, _ = extend_categories(base, hierarchy)

    def expand(results: list[dict[str, Any]], image: dict[str, Any]) -> list[dict[str, Any]]:
        sizes = {image["id"]: (image["width"], image["height"])}
        expanded, _ = expand_detections(results, hierarchy, base, sizes, merge=merge)
        return expanded

    return expand, cats


def predict_paths(
    predictor: Any,
    paths: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    batch_size: int = 2,
    num_workers: int = 2,
    on_image: Callable[[str, np.ndarray | None, dict[str, torch.Tensor]], None] | None = None,
    progress: bool = True,
    expand: Expand | None = None,
    categories: Sequence[dict] | None = None,
    write_csv: bool = False,
) -> PredictSummary:
    """Predicts every path not already done in ``out_dir``; writes predictions.json and images.json.

    ``predictor`` is anything with ``predict(images)``, ``categories`` and ``device`` (a ``Predictor``,
    a TTA or ensemble wrapper).  ``expand`` post-processes one image's COCO results (parent classes);
    ``categories`` are then the categories written (default: the predictor's).  Under ``torchrun``
    each rank predicts every world_size-th image still to do into its own log, and rank 0 writes the
    merged outputs; the returned summary is the whole world's.
    """
    from tqdm import tqdm

    from vision.runtime.distributed import all_gather_object, broadcast_object, dist_info

    info = dist_info()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Rank 0 reads what is done and tells the others (a collective, so no rank has written yet):
    # every rank must shard the very same list.
    done = broadcast_object(_done_images(out_dir) if info.is_main else None)
    root_path = Path(root) if root is not None and Path(root).is_dir() else None
    names = [_relative_name(p, root_path) for p in paths]
    first_id = max(done.values(), default=0) + 1
    first_index: dict[str, int] = {}
    for i, n in enumerate(names):  # a file listed twice is predicted once
        first_index.setdefault(n, i)
    todo = [i for n, i in first_index.items() if n not in done]
    # Ids are fixed before sharding, so every rank numbers its images the way one process would.
    mine = list(range(info.rank, len(todo), info.world_size))
    summary = PredictSummary(resumed=len(first_index) - len(todo))
    loader = DataLoader(
        ImageFiles([paths[todo[j]] for j in mine]),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_keep_lists,
        pin_memory=predictor.device.type == "cuda",
    )
    with _open_for_append(_partial_path(out_dir, info.rank, info.world_size)) as partial, tqdm(
        total=len(mine), desc="predict", unit="img", disable=not progress or not info.is_main, dynamic_ncols=True
    ) as bar:
        for predicted, batch_len in predict_batches(predictor, loader, summary.skipped):
            for i, img, pred in predicted:
                j = mine[i]
                path, name = paths[todo[j]], names[todo[j]]
                image_id = first_id + j
                image_entry = {"id": image_id, "file_name": name, "width": int(img.shape[2]), "height": int(img.shape[1])}
                results = prediction_to_results(image_id, pred, predictor.categories)
                if expand is not None:
                    results = expand(results, image_entry)
                partial.write(json.dumps({"image": image_entry, "results": results}) + "\n")
                summary.done += 1
                summary.detections += len(results)
                if on_image is not None:
                    on_image(path, img.permute(1, 2, 0).numpy(), pred)
            partial.flush()
            bar.update(batch_len)
    if info.enabled:
        parts = all_gather_object(summary)
        summary = PredictSummary(
            done=sum(s.done for s in parts),
            resumed=summary.resumed,
            skipped=sorted(e for s in parts for e in s.skipped),
            detections=sum(s.detections for s in parts),
        )
    if info.is_main:
        cats = list(categories) if categories is not None else predictor.categories.to_coco()
        write_outputs(out_dir, cats, write_csv=write_csv)
    return summary


def _merged_entries(out_dir: Path) -> Iterator[dict[str, Any]]:
    """Every finished image once (the first run that did it wins), in image-id order, streamed.

    Each log is in id order (ids only grow, run after run), so a k-way merge keeps memory flat.
    """
    keep = set(_done_images(out_dir).values())
    streams = [_iter_file(p) for p in _partial_files(out_dir)]
    for entry in heapq.merge(*streams, key=lambda e: e["image"]["id"]):
        image_id = entry["image"]["id"]
        if image_id in keep:
            keep.discard(image_id)
            yield entry


def write_outputs(out_dir: Path, categories: Categories | Sequence[dict], write_csv: bool = False) -> None:
    """predictions.json + images.json (+ predictions.csv) from the partial logs, each written atomically.

    Results are streamed from the logs to the files, so only the images list is held in memory.
    """
    out_dir = Path(out_dir)
    cats = categories.to_coco() if isinstance(categories, Categories) else [dict(c) for c in categories]
    name_of = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}
    images: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        pf = stack.enter_context(atomic_write(out_dir / "predictions.json", "w"))
        writer = None
        if write_csv:
            writer = csv.writer(stack.enter_context(atomic_write(out_dir / "predictions.csv", "w", newline="")))
            writer.writerow(["file_name", "class", "score", "x1", "y1", "x2", "y2"])
        pf.write("[")
        first = True
        for entry in _merged_entries(out_dir):
            image = entry["image"]
            images.append(image)
            for r in entry["results"]:
                pf.write(("" if first else ", ") + json.dumps(r))
                first = False
                if writer is not None:
                    x, y, w, h = r["bbox"]
                    writer.writerow([
                        image["file_name"], name_of.get(int(r["category_id"]), r["category_id"]),
                        f"{r['score']:.6g}", f"{x:.2f}", f"{y:.2f}", f"{x + w:.2f}", f"{y + h:.2f}",
                    ])
        pf.write("]")
    _atomic_json(out_dir / "images.json", {"images": images, "categories": cats})


def _atomic_json(path: Path, obj: Any) -> None:
    with atomic_write(path, "w") as f:
        f.write(json.dumps(obj))
