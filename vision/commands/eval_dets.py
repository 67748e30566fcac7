"""``vision eval-dets``: COCO evaluation of a results file, no model involved."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vision.data.coco import coco_to_detection_set, load_json
from vision.errors import DataError
from vision.metrics.coco import check_results, evaluate_coco, explain_undefined, format_per_class


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", required=True, help="ground truth, COCO JSON")
    parser.add_argument("--dets", required=True, help="detections, COCO results JSON (a list)")
    parser.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    parser.add_argument("--out", help="write the metrics as JSON here")
    parser.add_argument("--max-dets", type=int, default=None, help="detections per image for AP (COCO: 100)")
    parser.add_argument("--hierarchy", help="class hierarchy JSON: expand the ground truth to parent classes")
    parser.add_argument(
        "--images",
        help="images of the results file (id, file_name), matched to the ground truth by file name "
        "(default: the images.json that vision predict writes beside its predictions.json, if there is one)",
    )


def run(args: argparse.Namespace) -> int:
    gt = load_json(args.gt)
    # validates ids, categories and boxes with one-line errors; no image is read, so any file name goes
    coco_to_detection_set(gt, args.gt, allow_outside_paths=True)
    dets = load_json(args.dets)
    if isinstance(dets, dict) and "annotations" in dets:
        dets = dets["annotations"]
    if not isinstance(dets, list):
        raise DataError(args.dets, "expected a list of COCO results")
    images_file = Path(args.images) if args.images else Path(args.dets).parent / "images.json"
    if args.images or images_file.is_file():
        gt, dets = _match_by_file_name(gt, dets, images_file, args.dets)
    if args.hierarchy:
        from vision.ensemble.hierarchy import expand_coco_ground_truth, load_hierarchy

        gt = expand_coco_ground_truth(gt, load_hierarchy(args.hierarchy))
    dets = check_results(gt, dets, source=args.dets)
    metrics = evaluate_coco(gt, dets, args.iou_type, max_dets=args.max_dets)
    print(explain_undefined(metrics["summary"]), end="")
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


def _match_by_file_name(gt: dict, dets: list, images_file: Path, dets_file: str) -> tuple[dict, list]:
    """Results renumbered to the ground truth's image ids, and the ground truth cut to the images
    that were predicted (an image predicted with no detections still counts, as a miss)."""
    from vision.metrics.image_matching import match_images, restrict_ground_truth

    listed = load_json(images_file)
    predicted = listed.get("images") if isinstance(listed, dict) else listed
    if not isinstance(predicted, list):
        raise DataError(images_file, "expected an 'images' list")
    match = match_images(gt.get("images", []), predicted, str(images_file))
    if not match.ids:
        raise DataError(images_file, f"no image's file name is in the ground truth {len(gt.get('images', []))} images")
    listed_ids = {int(i["id"]) for i in predicted}
    renumbered = []
    for k, r in enumerate(dets):
        image_id = r.get("image_id") if isinstance(r, dict) else None
        if image_id not in listed_ids:
            raise DataError(dets_file, f"entry {k}: image id {image_id} is not in {images_file}")
        if image_id in match.ids:
            renumbered.append({**r, "image_id": match.ids[image_id]})
    n_gt = len(gt.get("images", []))
    gt = restrict_ground_truth(gt, set(match.ids.values()))
    notes = [f"matched {len(match.ids)} images by file name ({images_file})"]
    if len(match.ids) < n_gt:
        notes.append(f"evaluated on those {len(match.ids)} of the ground truth's {n_gt} images")
    if match.unmatched:
        notes.append(f"{len(match.unmatched)} predicted images not in the ground truth ignored ({match.unmatched[0]}, ...)")
    print("; ".join(notes))
    return gt, renumbered
