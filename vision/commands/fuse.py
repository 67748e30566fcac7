"""``vision fuse``: fuse several COCO results files into one (NMS, soft-NMS, WBF, score-sum NMS)."""

from __future__ import annotations

import argparse
import time

from vision.ensemble.fusion import METHODS
from vision.ensemble.results import fuse_results, load_images, load_results, write_json
from vision.errors import VisionError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dets", nargs="+", required=True, help="COCO results files, one per model")
    parser.add_argument("--images", required=True, help="COCO JSON with the 'images' list (sizes) and categories")
    parser.add_argument("--out", required=True, help="fused COCO results file to write")
    parser.add_argument("--method", choices=METHODS, default="wbf")
    parser.add_argument("--model-weights", nargs="+", type=float, help="one weight per --dets file")
    parser.add_argument("--iou", type=float, help="IoU threshold (default: 0.55 for wbf, 0.5 otherwise)")
    parser.add_argument("--skip-score", type=float, default=0.0, help="drop detections scoring below this first")
    parser.add_argument("--conf-type", default="avg", help="WBF score: avg, max, box_and_model_avg, absent_model_aware_avg")
    parser.add_argument("--soft-method", choices=("linear", "gaussian"), default="gaussian")
    parser.add_argument("--sigma", type=float, default=0.5, help="Gaussian soft-NMS sigma")
    parser.add_argument("--soft-scores", choices=("decayed", "original"), default="decayed",
                        help="soft-NMS output scores: decayed (soft-NMS proper) or the original ones, as"
                             " ensemble-boxes returns them")
    parser.add_argument("--hierarchy", help="class hierarchy JSON: also add parent-class copies of the fused detections")
    parser.add_argument("--class-descriptions", help="Open Images class-descriptions CSV (MID -> name) for --hierarchy")


def run(args: argparse.Namespace) -> int:
    if args.model_weights is not None and len(args.model_weights) != len(args.dets):
        raise VisionError(f"--model-weights has {len(args.model_weights)} values for {len(args.dets)} --dets files")
    start = time.perf_counter()
    sizes, categories = load_images(args.images)
    results = [load_results(p) for p in args.dets]
    options = {}
    if args.method == "wbf":
        options["conf_type"] = args.conf_type
    if args.method == "soft_nms":
        options.update(soft_method=1 if args.soft_method == "linear" else 2, sigma=args.sigma,
                       decayed_scores=args.soft_scores == "decayed")
    try:
        fused = fuse_results(
            results, sizes, args.method, args.model_weights, args.iou, args.skip_score,
            names=args.dets, images_name=args.images, **options,
        )
    except ValueError as e:  # a bad option value (e.g. an unknown --conf-type)
        raise VisionError(str(e)) from None
    n_parent = 0
    if args.hierarchy:
        from vision.ensemble.hierarchy import expand_detections, load_hierarchy

        hierarchy = load_hierarchy(args.hierarchy, args.class_descriptions)
        before = len(fused)
        fused, cats = expand_detections(fused, hierarchy, categories, sizes, names=(args.out, args.images))
        n_parent = len(fused) - before
        _write_added_categories(args.out, categories, cats)
    write_json(args.out, fused)
    n_in = sum(len(r) for r in results)
    extra = f", {n_parent:+d} from parent classes" if args.hierarchy else ""
    print(
        f"wrote {args.out}: {len(fused)} detections fused by {args.method} from {n_in} in {len(args.dets)} files"
        f"{extra} ({time.perf_counter() - start:.1f} s)"
    )
    return 0


def _write_added_categories(out: str, before: list, after: list) -> None:
    if len(after) > len(before):
        path = out[:-5] + ".categories.json" if out.endswith(".json") else out + ".categories.json"
        write_json(path, after)
        added = ", ".join(c["name"] for c in after[len(before) :])
        print(f"added categories missing from the images file ({added}); full list in {path}")
