"""``vision eval [CONFIG] --weights W [key=value ...] [--out metrics.json]``.

Evaluates on the config's validation split and prints the COCO table and per-class AP.  A vision
checkpoint carries its config (CONFIG then only needs to be given to change the data); a plain
torchvision state_dict needs the CONFIG that describes its model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML recipe (optional for a vision checkpoint)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--weights", required=True, help="vision checkpoint (.pt) or a plain state_dict")
    parser.add_argument("--out", help="metrics JSON (default: metrics.json beside the weights)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward pass")


def run(args: argparse.Namespace) -> int:
    from vision.tasks.evaluation import evaluate_checkpoint

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():
        overrides.insert(0, config)
        config = None
    result = evaluate_checkpoint(args.weights, config, overrides, out=args.out, batch_size=args.batch_size)
    _print_report(result.metrics)
    for path in result.plots:
        print(f"plot -> {path}")
    print(f"{result.task.headline(result.metrics)}  ({result.num_images} images) -> {result.metrics_file}")
    return 0


def _print_report(metrics: dict[str, Any]) -> None:
    from vision.metrics.coco import explain_undefined, format_per_class

    for iou_type, text in (metrics.get("summary") or {}).items():
        print(f"{iou_type}:")
        print(explain_undefined(text), end="")
    for key, table in metrics.items():
        if key.startswith("per_class") and isinstance(table, dict):
            print(format_per_class(table, title="AP" if key in ("per_class", "per_class_segm") else key[10:] or "value"))
