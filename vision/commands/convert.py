"""``vision convert``: VOC XML / YOLO txt / COCO JSON -> clean COCO JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from vision.data.coco import read_coco, write_coco
from vision.data.voc import read_voc
from vision.data.yolo import read_class_names, read_yolo
from vision.errors import VisionError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="fmt", choices=("voc", "yolo", "coco"), required=True)
    parser.add_argument("--labels", required=True, help="VOC: the XML folder; YOLO: the label-file folder; COCO: the JSON")
    parser.add_argument("--images", required=True, help="the image folder")
    parser.add_argument("--names", help="class names, one per line (required for YOLO; fixes the order for VOC)")
    parser.add_argument("--ids", help="VOC: an ImageSets list file choosing which XML files to convert")
    parser.add_argument("--out", required=True, help="COCO JSON to write")
    parser.add_argument(
        "--allow-outside-paths", action="store_true",
        help="COCO / VOC: accept image file names that are absolute or lead out of --images with '..'",
    )


def run(args: argparse.Namespace) -> int:
    names = read_class_names(args.names) if args.names else None
    if args.fmt == "voc":
        det_set = read_voc(
            args.labels, args.images, ids_file=args.ids, class_names=names,
            allow_outside_paths=args.allow_outside_paths,
        )
    elif args.fmt == "yolo":
        if names is None:
            raise VisionError("--from yolo needs --names (a file with one class name per line, or data.yaml)")
        det_set = read_yolo(args.labels, args.images, names)
    else:
        det_set = read_coco(args.labels, args.images, allow_outside_paths=args.allow_outside_paths)
    for line in det_set.dropped:
        print(f"dropped {line}")
    for line in det_set.skipped_images:
        print(f"skipped {line}")
    write_coco(det_set, args.out)
    num_boxes = sum(len(r) for r in det_set.records)
    print(
        f"wrote {Path(args.out)}: {len(det_set)} images, {num_boxes} boxes, {len(det_set.categories)} categories"
        f" ({len(det_set.dropped)} zero-area boxes dropped, {len(det_set.skipped_images)} unreadable images skipped)"
    )
    return 0
