"""``vision inspect CONFIG [key=value ...] [--out DIR]``: the data a recipe will train on, before training.

Reads the config's splits with the training readers (image headers only, no model) and prints, and
writes as ``inspect.json`` and ``inspect.png`` (default folder: ``<output_dir>/<name>/inspect``),
image counts and sizes, objects per image, box sizes after the recipe's resize against its anchors,
class counts with a sampler suggestion, and the problems the readers found.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.root=PATH")
    parser.add_argument("--out", metavar="DIR", help="report folder (default: <output_dir>/<name>/inspect)")


def _split_lines(name: str, s: dict[str, Any]) -> list[str]:
    lines = [f"{name}: {s['images']} images ({s['source']})"]
    if "samples" in s:
        lines[0] = f"{name}: {s['samples']} samples from {s['images']} images ({s['source']})"
    if s["width"]:
        w, h = s["width"], s["height"]
        lines.append(f"  size      width {w['min']:.0f}/{w['median']:.0f}/{w['max']:.0f}  "
                     f"height {h['min']:.0f}/{h['median']:.0f}/{h['max']:.0f}  (min/median/max)")
    per = s.get("objects_per_image")
    if per and per["mean"] is not None:
        lines.append(f"  objects   {s['objects']}: {per['mean']:.2f} per image (max {per['max']}), "
                     f"{per['images_with_none']} images with none")
    boxes = s.get("box_side_px", {})
    if boxes.get("resized"):
        r, o = boxes["resized"], boxes["original"]
        lines.append(f"  box side  p1/p50/p99 {r['p1']:.0f}/{r['p50']:.0f}/{r['p99']:.0f} px at min_size "
                     f"{boxes['resize']['evaluated_at']} (original {o['p1']:.0f}/{o['p50']:.0f}/{o['p99']:.0f})")
    if s.get("crop_side_px"):
        c = s["crop_side_px"]
        lines.append(f"  crop side p1/p50/p99 {c['p1']:.0f}/{c['p50']:.0f}/{c['p99']:.0f} px")
    a = s.get("anchors")
    if a:
        lines.append(f"  anchors   {a['sizes']} x ratios {a['aspect_ratios']}: {a['covered']:.1%} of boxes "
                     f"matched at IoU {a['iou']}")
    c = s["classes"]
    counts = ", ".join(f"{n} {v}" for n, v in c["counts"].items())
    lines.append(f"  classes   {counts}" + (f"  (imbalance {c['imbalance']}:1)" if c["imbalance"] else ""))
    return lines


def run(args: argparse.Namespace) -> int:
    from vision.atomic import atomic_write
    from vision.config import load_config
    from vision.data.stats import inspect_data, public
    from vision.metrics.data_plots import plot_dataset_report
    from vision.tasks.training import run_dir_of

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else run_dir_of(cfg) / "inspect"
    report = inspect_data(cfg)
    for name, s in report["splits"].items():
        print("\n".join(_split_lines(name, s)))
    for w in report["warnings"]:
        print(f"warning: {w}")
    with atomic_write(out / "inspect.json", "w") as f:
        json.dump(public(report), f, indent=2)
    png = plot_dataset_report(report, out / "inspect.png")
    print(f"{len(report['warnings'])} warnings -> {out / 'inspect.json'}, {png}")
    return 0
