"""``vision expand``: add parent-class copies of detections from a class hierarchy (Open Images style)."""

from __future__ import annotations

import argparse

from vision.commands.fuse import _write_added_categories
from vision.ensemble.fusion import METHODS
from vision.ensemble.hierarchy import expand_detections, load_hierarchy
from vision.ensemble.results import load_images, load_results, write_json
from vision.errors import DataError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dets", required=True, help="COCO results file")
    parser.add_argument("--images", required=True, help="COCO JSON with 'images' (sizes) and 'categories' (names)")
    parser.add_argument("--hierarchy", required=True, help="Open Images hierarchy JSON or {child: [parents]} JSON")
    parser.add_argument("--class-descriptions", help="Open Images class-descriptions CSV (MID -> name)")
    parser.add_argument("--out", required=True, help="expanded COCO results file to write")
    parser.add_argument("--merge", choices=(*METHODS, "none"), default="nms",
                        help="how overlapping copies of one class are merged (default nms)")
    parser.add_argument("--iou", type=float, help="IoU threshold for --merge (method default if omitted)")


def run(args: argparse.Namespace) -> int:
    sizes, categories = load_images(args.images)
    dets = load_results(args.dets)
    for d in dets:
        if d["image_id"] not in sizes:
            raise DataError(args.dets, f"image id {d['image_id']!r} is not in {args.images}")
    hierarchy = load_hierarchy(args.hierarchy, args.class_descriptions)
    merge = None if args.merge == "none" else args.merge
    out, cats = expand_detections(dets, hierarchy, categories, sizes, merge, args.iou, names=(args.dets, args.images))
    _write_added_categories(args.out, categories, cats)
    write_json(args.out, out)
    matched = sum(1 for c in categories if hierarchy.resolve(str(c.get("name", ""))) is not None)
    print(
        f"wrote {args.out}: {len(out)} detections from {len(dets)} ({len(out) - len(dets):+d} after parent copies"
        f" and merging; {matched}/{len(categories)} categories found in the hierarchy)"
    )
    return 0
