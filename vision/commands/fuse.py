"""``vision fuse``: fuse several COCO results files into one (NMS, soft-NMS, WBF, score-sum NMS).

Checks on the inputs (the whole files are checked before anything is written; the output is written
atomically, so a failed run leaves an existing output file as it was):

- rejected with ``error: <file>: <problem>``: a missing or malformed file, an entry without
  ``image_id`` / ``category_id`` / ``bbox`` / ``score`` or with values of the wrong type, an image id
  not in ``--images``, a category id not among its categories (when it lists any), a score outside
  [0, 1], a box with a negative width or height; ``--iou`` outside (0, 1], ``--model-weights`` that are
  negative, not finite, all zero or not one per file, ``--skip-score`` outside [0, 1];
- dropped and counted in the summary line: detections whose box or score is NaN or infinite (so a NaN
  never reaches the fused boxes or the output), and WBF clusters whose scores are all 0 (their fused
  box is 0/0, as in ensemble-boxes).

The fast path builds no Python object per detection: results files are read straight into columns
(``vision/ensemble/_columns.c``), checked and fused as arrays (``vision.ensemble.detections``), and
only msgspec's encoder sees rows.  It imports neither torch nor pycocotools (only for masks) nor, for
files of ordinary size, Numba (``vision.ensemble._wbf._choose_kernel``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

if "numpy" not in sys.modules:
    # Fusion is NumPy without matrix products, on one thread: OpenBLAS's thread pool, which NumPy starts
    # on import, would only add its start-up (60 ms of CPU on 2 cores, 3% of a large fusion's).  A
    # process that imported NumPy already, or a user's own setting, is left as it is.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from vision.ensemble.fusion import METHODS
from vision.errors import VisionError

HELP_EPILOG = """Entries with a NaN or infinite box or score are dropped and counted; unknown image or
category ids, scores outside [0, 1] and boxes with a negative width or height are errors naming the file
and the entry's index. The output is written atomically."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = HELP_EPILOG
    parser.add_argument("--dets", nargs="+", required=True, help="COCO results files, one per model")
    parser.add_argument("--images", required=True, help="COCO JSON with the 'images' list (sizes) and categories")
    parser.add_argument("--out", required=True, help="fused COCO results file to write")
    parser.add_argument("--method", choices=METHODS, default="wbf")
    parser.add_argument("--model-weights", nargs="+", type=float,
                        help="one finite, non-negative weight per --dets file")
    parser.add_argument("--iou", type=float, help="IoU threshold in (0, 1] (default: 0.55 for wbf, 0.5 otherwise)")
    parser.add_argument("--skip-score", type=float, default=0.0, help="drop detections scoring below this first")
    parser.add_argument("--conf-type", default="avg", help="WBF score: avg, max, box_and_model_avg, absent_model_aware_avg")
    parser.add_argument("--soft-method", choices=("linear", "gaussian"), default="gaussian")
    parser.add_argument("--sigma", type=float, default=0.5, help="Gaussian soft-NMS sigma")
    parser.add_argument("--soft-scores", choices=("decayed", "original"), default="decayed",
                        help="soft-NMS output scores: decayed (soft-NMS proper) or the original ones, as"
                             " ensemble-boxes returns them")
    parser.add_argument("--hierarchy", help="class hierarchy JSON: also add parent-class copies of the fused detections")
    parser.add_argument("--class-descriptions", help="Open Images class-descriptions CSV (MID -> name) for --hierarchy")


def check_options(args: argparse.Namespace) -> None:
    """Option values that would make the fusion meaningless (or NaN), as one-line errors."""
    if args.model_weights is not None:
        w = args.model_weights
        if len(w) != len(args.dets):
            raise VisionError(f"--model-weights has {len(w)} values for {len(args.dets)} --dets files")
        if not all(math.isfinite(x) and x >= 0 for x in w):
            raise VisionError(f"--model-weights must be finite and non-negative, got {' '.join(map(str, w))}")
        if not any(x > 0 for x in w):
            raise VisionError("--model-weights are all zero")
    if args.iou is not None and not 0 < args.iou <= 1:
        raise VisionError(f"--iou must be in (0, 1], got {args.iou}")
    if not 0 <= args.skip_score <= 1:
        raise VisionError(f"--skip-score must be in [0, 1], got {args.skip_score}")
    if not (math.isfinite(args.sigma) and args.sigma > 0):
        raise VisionError(f"--sigma must be positive, got {args.sigma}")


def run(args: argparse.Namespace) -> int:
    check_options(args)
    from vision.ensemble.detections import ImageTable, check_detections, fuse_detections
    from vision.ensemble.results import gc_paused, load_images, read_detections, write_detections, write_json

    start = time.perf_counter()
    sizes, categories = load_images(args.images)
    table = ImageTable.from_sizes(sizes, args.images)
    cat_ids = _category_ids(categories, args.images)
    models, n_in, n_nonfinite = [], 0, 0
    for path in args.dets:
        dets, dropped = check_detections(read_detections(path), path, table.ids, cat_ids, args.images)
        models.append(dets)
        n_in += len(dets) + dropped
        n_nonfinite += dropped
    options = {}
    if args.method == "wbf":
        options["conf_type"] = args.conf_type
    if args.method == "soft_nms":
        options.update(soft_method=1 if args.soft_method == "linear" else 2, sigma=args.sigma,
                       decayed_scores=args.soft_scores == "decayed")
    try:
        with gc_paused():
            fused, n_degenerate = fuse_detections(
                models, table, args.method, args.model_weights, args.iou, args.skip_score, **options
            )
    except ValueError as e:  # a bad option value (e.g. an unknown --conf-type)
        raise VisionError(str(e)) from None
    n_parent = 0
    if args.hierarchy:
        from vision.ensemble.hierarchy import expand_detections, load_hierarchy

        hierarchy = load_hierarchy(args.hierarchy, args.class_descriptions)
        plain = fused.to_dicts()
        out, cats = expand_detections(plain, hierarchy, categories, sizes, names=(args.out, args.images))
        n_parent = len(out) - len(plain)
        _write_added_categories(args.out, categories, cats)
        write_json(args.out, out)
        n_out = len(out)
    else:
        write_detections(args.out, fused)
        n_out = len(fused)
    extra = f", {n_parent:+d} from parent classes" if args.hierarchy else ""
    if n_nonfinite:
        extra += f"; dropped {n_nonfinite} input detections with a NaN or infinite box or score"
    if n_degenerate:
        extra += f"; dropped {n_degenerate} fused boxes of zero-score clusters"
    print(
        f"wrote {args.out}: {n_out} detections fused by {args.method} from {n_in} in {len(args.dets)} files"
        f"{extra} ({time.perf_counter() - start:.1f} s)"
    )
    if n_nonfinite:
        print(f"warning: {n_nonfinite} detections with a NaN or infinite box or score were dropped", file=sys.stderr)
    return 0


def _category_ids(categories: list, images_name: str):
    import numpy as np

    from vision.errors import DataError

    try:
        ids = [int(c["id"]) for c in categories]
    except (KeyError, TypeError, ValueError):
        raise DataError(images_name, "every category needs an integer 'id'") from None
    return np.array(ids, dtype=np.int64) if ids else None


def _write_added_categories(out: str, before: list, after: list) -> None:
    from vision.ensemble.results import write_json

    if len(after) > len(before):
        path = out[:-5] + ".categories.json" if out.endswith(".json") else out + ".categories.json"
        write_json(path, after)
        added = ", ".join(c["name"] for c in after[len(before) :])
        print(f"added categories missing from the images file ({added}); full list in {path}")
