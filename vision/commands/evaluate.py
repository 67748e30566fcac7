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


def run(args: argparse.Namespace) -> int:
    from vision.data.build import drop_unreadable_images, read_split
    from vision.data.dataset import DetectionDataset
    from vision.data.transforms import build_eval_transform
    from vision.engine.coco_eval import evaluate_detections, format_per_class
    from vision.engine.device import select_device
    from vision.engine.trainer import predict_dataset
    from vision.errors import ConfigError
    from vision.models import build_model
    from vision.models.weights import load_checkpoint, load_model_weights

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    ckpt = load_checkpoint(args.weights)  # {"model": state_dict[, "config", "class_names", ...]}
    cfg = resolve_eval_config(config, overrides, ckpt, args.weights)
    class_names = ckpt.get("class_names")

    d = cfg.data
    split = d.val if d.val.ann else d.train
    names = list(class_names) if class_names else d.class_names
    val_set = drop_unreadable_images(read_split(split, d.root, names))
    if class_names and list(val_set.categories.names) != list(class_names):
        raise ConfigError(
            f"{args.weights} was trained on classes {list(class_names)}, the validation set has "
            f"{list(val_set.categories.names)}"
        )
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = len(val_set.categories)
    cfg.model.pretrained = None  # the weights below replace any backbone initialisation
    device = select_device(cfg.train.device)
    model = build_model(cfg.model)
    load_model_weights(model, args.weights)
    model.to(device).eval()

    dataset = DetectionDataset(val_set, build_eval_transform(), d.with_masks, d.skip_difficult)
    preds = predict_dataset(
        model, dataset, val_set, device, batch_size=args.batch_size or d.batch_size,
        num_workers=d.num_workers, amp=cfg.train.amp,
    )
    iou_types = ("bbox", "segm") if d.with_masks else ("bbox",)
    metrics = evaluate_detections(val_set, preds, iou_types)
    for iou_type in iou_types:
        print(f"{iou_type}:")
        print(metrics["summary"][iou_type], end="")
    print(format_per_class(metrics["per_class"]))

    out = Path(args.out) if args.out else Path(args.weights).parent / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in metrics.items() if k != "summary"}
    record.update({"weights": str(args.weights), "num_images": len(val_set), "source": val_set.source})
    out.write_text(json.dumps(record, indent=2))
    m = metrics["bbox"]
    print(f"box AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}  ({len(val_set)} images) -> {out}")
    return 0
