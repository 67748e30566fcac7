"""``vision eval-dets``: COCO evaluation of a results file, no model involved."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vision.data.coco import coco_to_detection_set, load_json
from vision.engine.coco_eval import check_results, evaluate_coco, format_per_class
from vision.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", required=True, help="ground truth, COCO JSON")
    parser.add_argument("--dets", required=True, help="detections, COCO results JSON (a list)")
    parser.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    parser.add_argument("--out", help="write the metrics as JSON here")
    parser.add_argument("--max-dets", type=int, default=None, help="detections per image for AP (COCO: 100)")
    parser.add_argument("--hierarchy", help="class hierarchy JSON: expand the ground truth to parent classes")


def run(args: argparse.Namespace) -> int:
    gt = load_json(args.gt)
    coco_to_detection_set(gt, args.gt)  # validates ids, categories and boxes with one-line errors
    dets = load_json(args.dets)
    if isinstance(dets, dict) and "annotations" in dets:
        dets = dets["annotations"]
    if not isinstance(dets, list):
        raise DataError(args.dets, "expected a list of COCO results")
    if args.hierarchy:
        from vision.ensemble.hierarchy import expand_coco_ground_truth, load_hierarchy

        gt = expand_coco_ground_truth(gt, load_hierarchy(args.hierarchy))
    dets = check_results(gt, dets, source=args.dets)
    metrics = evaluate_coco(gt, dets, args.iou_type, max_dets=args.max_dets)
    print(metrics["summary"], end="")
    print(format_per_class(metrics["per_class"]))
    if args.out:
        out = {args.iou_type: metrics[args.iou_type], "per_class": metrics["per_class"]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    m = metrics[args.iou_type]
    print(
        f"{args.iou_type} AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}"
        f"  ({len(dets)} detections, {len(gt['images'])} images)" + (f"  -> {args.out}" if args.out else "")
    )
    return 0
