"""``vision eval [CONFIG] --weights W [key=value ...] [--out metrics.json]``.

Evaluates on the config's validation split and prints the COCO table and per-class AP.  A vision
checkpoint carries its config (CONFIG then only needs to be given to change the data); a plain
torchvision state_dict needs the CONFIG that describes its model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML recipe (optional for a vision checkpoint)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--weights", required=True, help="vision checkpoint (.pt) or a plain state_dict")
    parser.add_argument("--out", help="metrics JSON (default: metrics.json beside the weights)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass")


def _deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_eval_config(config: str | None, overrides: list[str], ckpt: dict[str, Any], weights: str):
    """CONFIG (+ overrides) when given, else the checkpoint's own config (+ overrides)."""
    from vision.config import config_from_dict, load_config, parse_overrides
    from vision.errors import ConfigError

    if config:
        return load_config(config, overrides)
    if isinstance(ckpt.get("config"), dict):
        return config_from_dict(_deep_update(ckpt["config"], parse_overrides(overrides)))
    raise ConfigError(f"{weights} is a plain state_dict with no config inside: give the CONFIG it was trained with")


DETECTION_ARCHS = ("retinanet", "faster_rcnn", "mask_rcnn")


def run(args: argparse.Namespace) -> int:
    from vision.models import build_model
    from vision.models.weights import load_checkpoint, load_model_weights
    from vision.runtime.device import select_device

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    ckpt = load_checkpoint(args.weights)  # {"model": state_dict[, "config", "class_names", ...]}
    cfg = resolve_eval_config(config, overrides, ckpt, args.weights)
    class_names = ckpt.get("class_names")
    if class_names and not cfg.data.class_names:
        cfg.data.class_names = list(class_names)

    if cfg.model.arch in DETECTION_ARCHS:
        val_set, dataset, predict, evaluate = _detection_parts(cfg, class_names, args.weights)
    else:
        val_set, dataset, predict, evaluate = _task_parts(cfg)
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = len(val_set.categories)
    cfg.model.pretrained = None  # the weights below replace any backbone initialisation
    cfg.model.init_from = None
    device = select_device(cfg.train.device)
    model = build_model(cfg.model)
    load_model_weights(model, args.weights)
    model.to(device).eval()

    preds = predict(
        model, dataset, val_set, device, batch_size=args.batch_size or cfg.data.batch_size,
        num_workers=cfg.data.num_workers, amp=cfg.train.amp,
    )
    from vision.metrics.coco import keep_coco_evals

    with keep_coco_evals() as coco_evals:  # pycocotools' accumulated evaluation, for the PR curves
        metrics = evaluate(val_set, preds)
    _print_report(metrics)

    out = Path(args.out) if args.out else Path(args.weights).parent / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in metrics.items() if k != "summary"}
    record.update({"weights": str(args.weights), "num_images": len(val_set), "source": val_set.source})
    out.write_text(json.dumps(record, indent=2))
    from vision.metrics.eval_plots import write_eval_plots

    for path in write_eval_plots(metrics, val_set, preds, out.parent, coco_evals):
        print(f"plot -> {path}")
    print(f"{_headline(metrics)}  ({len(val_set)} images) -> {out}")
    return 0


def _detection_parts(cfg, class_names, weights):
    """The validation split read on its own (no training set needed), scored with COCO AP."""
    from vision.data.build import drop_unreadable_images, read_split
    from vision.data.dataset import DetectionDataset
    from vision.data.transforms import build_eval_transform
    from vision.engine.trainer import default_evaluator, predict_dataset
    from vision.errors import ConfigError

    d = cfg.data
    split = d.val if d.val.ann else d.train
    names = list(class_names) if class_names else d.class_names
    val_set = drop_unreadable_images(read_split(split, d.root, names))
    if class_names and list(val_set.categories.names) != list(class_names):
        raise ConfigError(
            f"{weights} was trained on classes {list(class_names)}, the validation set has "
            f"{list(val_set.categories.names)}"
        )
    with_masks = d.with_masks or cfg.model.arch == "mask_rcnn"
    dataset = DetectionDataset(val_set, build_eval_transform(), with_masks, d.skip_difficult)
    return val_set, dataset, predict_dataset, default_evaluator(with_masks, cfg.model.detections_per_img)


def _task_parts(cfg):
    """Other model kinds: the validation parts of their training task."""
    from vision.tasks import build_task

    task = build_task(cfg)
    return task.val_set, task.val_dataset, task.predict, task.evaluate


def _print_report(metrics: dict[str, Any]) -> None:
    from vision.metrics.coco import explain_undefined, format_per_class

    for iou_type, text in (metrics.get("summary") or {}).items():
        print(f"{iou_type}:")
        print(explain_undefined(text), end="")
    for key, table in metrics.items():
        if key.startswith("per_class") and isinstance(table, dict):
            print(format_per_class(table, title="AP" if key in ("per_class", "per_class_segm") else key[10:] or "value"))


def _headline(metrics: dict[str, Any]) -> str:
    if "bbox" in metrics:
        m = metrics["bbox"]
        text = f"box AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}"
        if "segm" in metrics:
            text += f"  mask AP {metrics['segm']['AP']:.4f}"
        return text
    from vision.engine.trainer import flat_metrics

    return "  ".join(f"{k} {v:.4f}" for k, v in list(flat_metrics(metrics).items())[:6])
