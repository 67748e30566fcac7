"""Classifier inference: over a data set (training-time evaluation), over image files (``vision predict``),
and a checkpoint's evaluation report (metrics JSON + confusion matrix)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from vision.inference.engine import EngineOptions, optimize_for_inference, precision_context, precision_dtype
from vision.runtime.device import autocast, select_device
from vision.runtime.logging import progress


def predict_classification_dataset(
    model: nn.Module,
    dataset: Dataset,
    data_set: Any,
    device: torch.device,
    *,
    batch_size: int = 32,
    **kwargs: Any,
) -> dict[int, dict[str, torch.Tensor]]:
    """Sample index -> ``{"scores": [K]}`` for this rank's share, gathered on every rank."""
    from vision.data.classification import collate_classification
    from vision.engine.trainer import predict_shards

    def keep(images: list, targets: list, outputs: list, _: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        return {int(t["image_id"]): {"scores": o["scores"].detach().float().cpu()} for t, o in zip(targets, outputs)}

    return predict_shards(model, dataset, device, collate_classification, keep, batch_size=batch_size, **kwargs)


def evaluate_predictions(
    data_set: Any, predictions: dict[int, dict[str, torch.Tensor]], multi_label: bool | None = None
) -> dict[str, Any]:
    """Metrics of a ``ClassificationSet`` against predictions keyed by sample index: top-k accuracy, or
    mAP when ``multi_label`` (default: when the data set's samples have several labels)."""
    from vision.metrics.classification import classification_metrics, multilabel_metrics

    names = list(data_set.categories.names)
    keep = sorted(i for i in predictions if 0 <= i < len(data_set))
    scores = np.stack([predictions[i]["scores"].numpy() for i in keep]) if keep else np.zeros((0, len(names)))
    all_targets = data_set.targets(multi_label)
    targets = all_targets[keep] if keep else all_targets[:0]
    if targets.ndim == 2:
        return multilabel_metrics(targets, scores, names)
    return classification_metrics(targets, scores, names)


def classification_score(metrics: dict[str, Any] | None) -> float:
    """What ``best.pt`` follows: top-1 accuracy, or mAP for multi-label."""
    if not metrics:
        return float("nan")
    return float(metrics.get("mAP", metrics.get("top1", float("nan"))))


def evaluate_checkpoint(
    weights: str | os.PathLike, config: str | None = None, overrides: Sequence[str] = (),
    out_dir: str | os.PathLike | None = None, batch_size: int | None = None,
) -> dict[str, Any]:
    """Evaluates a classifier checkpoint on its config's validation split; writes the report files."""
    from vision.data.classification import (
        ClassificationDataset,
        build_classification_sets,
        build_cls_transform,
    )
    from vision.inference.predictor import load_model_for_inference
    from vision.metrics.classification import write_report

    model, cfg, _ = load_model_for_inference(weights, config, overrides)
    _, val_set = build_classification_sets(cfg)
    device = select_device(cfg.train.device)
    dataset = ClassificationDataset(val_set, build_cls_transform(cfg, training=False), cfg.model.multi_label)
    preds = predict_classification_dataset(
        model.to(device), dataset, val_set, device, batch_size=batch_size or max(cfg.data.batch_size, 32),
        num_workers=cfg.data.num_workers,
    )
    metrics = evaluate_predictions(val_set, preds, cfg.model.multi_label)
    write_report(metrics, Path(out_dir) if out_dir else Path(weights).parent)
    return metrics


def is_classifier_checkpoint(weights: str | os.PathLike) -> bool:
    """Whether ``vision predict`` should classify rather than detect with these weights."""
    from vision.models.weights import infer_arch, load_checkpoint

    ckpt = load_checkpoint(weights)
    arch = ckpt.get("arch") or (ckpt.get("config") or {}).get("model", {}).get("arch")
    return (arch or infer_arch(ckpt["model"])) == "classifier"


def predict_images(
    weights: str | os.PathLike, paths: Sequence[str], out_dir: str | os.PathLike, *, config: str | None = None,
    overrides: Sequence[str] = (), batch_size: int = 16, device: str = "auto", root: str | None = None,
    engine: EngineOptions | None = None, amp: bool = False,
) -> dict[str, Any]:
    """Classifies whole images; writes ``predictions.json`` (top-k classes and scores per file) and
    ``predictions.csv`` (file, class, score).  Unreadable files are skipped and named.  ``amp`` is
    mixed precision as in training (bfloat16 on a CPU, float16 on CUDA); ``engine.precision`` is the
    engine's own choice, checked before the first image is read."""
    from PIL import Image

    from vision.data.classification import build_cls_transform
    from vision.data.image_io import read_image
    from vision.errors import ImageReadError
    from vision.inference.predictor import load_model_for_inference

    model, cfg, categories = load_model_for_inference(weights, config, overrides)
    dev = select_device(device)
    engine = EngineOptions() if engine is None else engine
    precision_dtype(engine.precision, dev)  # a precision this device cannot run fails here, not mid-folder
    model = optimize_for_inference(model.to(dev), engine, copy_model=False)
    transform = build_cls_transform(cfg, training=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    base = Path(root).resolve() if root else None

    def name_of(p: str) -> str:
        if base is not None:
            try:
                return Path(p).resolve().relative_to(base).as_posix()
            except ValueError:
                pass
        return p

    bar = progress(len(paths), 0, "predict", True)
    try:
        for start in range(0, len(paths), batch_size):
            chunk, batch = [], []
            for p in paths[start : start + batch_size]:
                try:
                    batch.append(transform(Image.fromarray(read_image(p))))
                    chunk.append(p)
                except ImageReadError as e:
                    skipped.append(str(e))
            if batch:
                with torch.inference_mode(), autocast(dev, amp), precision_context(engine.precision, dev):
                    outputs = model([b.to(dev, non_blocking=True) for b in batch])
                for p, o in zip(chunk, outputs):
                    labels = o["labels"].tolist()
                    scores = o["scores"].float().cpu()
                    results.append({
                        "file_name": name_of(p),
                        "top_k": [{"class": categories.names[i], "score": float(scores[i])} for i in labels],
                    })
            bar.update(len(paths[start : start + batch_size]))
    finally:
        bar.close()
    (out / "predictions.json").write_text(json.dumps(results, indent=1))
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "class", "score"])
        for r in results:
            w.writerow([r["file_name"], r["top_k"][0]["class"], f"{r['top_k'][0]['score']:.6f}"])
    return {"done": len(results), "skipped": skipped, "out": str(out)}


def run_classifier_predict(args: Any) -> int:
    """``vision predict`` with a classifier checkpoint (the command's parsed arguments)."""
    from vision.commands.predict import engine_options
    from vision.data.image_io import list_images
    from vision.errors import VisionError

    if len(args.weights) > 1:
        raise VisionError("several --weights: ensembling classifiers is not supported")
    paths = list_images(args.source)
    if not paths:
        raise VisionError(f"{args.source}: no images found")
    root = args.source if Path(args.source).is_dir() else None
    summary = predict_images(
        args.weights[0], paths, args.out, config=args.config, overrides=args.overrides,
        batch_size=max(1, args.batch_size), device=args.device, root=root, engine=engine_options(args),
        amp=args.amp,
    )
    for line in summary["skipped"]:
        print(f"skipped {line}")
    out = Path(args.out)
    print(f"classified {summary['done']} images ({len(summary['skipped'])} unreadable skipped) -> "
          f"{out / 'predictions.json'}, {out / 'predictions.csv'}")
    return 0
