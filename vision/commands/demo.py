"""``vision demo``: the whole loop on embedded data, in about five CPU minutes.

Makes the synthetic shapes data set (the plain style: shapes a person tells apart at a glance), then
for each recipe, a RetinaNet and a Mask R-CNN from scratch: trains it as ``vision train`` does, predicts
on a folder of the validation images as ``vision predict`` does (drawing a few of them), and scores
those predictions with pycocotools as ``vision eval-dets`` does.  ``summary.json`` gathers the figures.

The data set is sized for a 2-core CPU: few, large, high-contrast objects of three classes on small
images, so that a few hundred iterations learn what the drawings show.  Each recipe caps its training
time (``train.time_budget_min``) beside its iteration count, so a slow or busy machine stops on time
(with a shorter schedule) instead of running long.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIG = CONFIGS / "demo_retinanet.yaml"
MASK_CONFIG = CONFIGS / "demo_mask_rcnn.yaml"
# three shapes a person tells apart at a glance
CLASSES = ("circle", "square", "triangle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="folder for the data, the runs and the predictions")
    parser.add_argument("--config", default=str(CONFIG), help="the detector's recipe")
    parser.add_argument("--mask-config", default=str(MASK_CONFIG), help="the Mask R-CNN recipe")
    parser.add_argument("--minutes", type=float, default=None,
                        help="the detector's training time budget (default: its recipe's)")
    parser.add_argument(
        "--mask-minutes", type=float, default=None,
        help="Mask R-CNN training budget (default: its recipe's; 0 skips the Mask R-CNN step)",
    )
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=80)
    parser.add_argument("--size", type=int, nargs=2, default=(160, 128), metavar=("W", "H"), help="synthetic image size")
    parser.add_argument("--classes", default=",".join(CLASSES),
                        help="comma-separated shape names (see `vision synthetic --help`), or a count")
    parser.add_argument("--objects", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"),
                        help="shapes per image")
    parser.add_argument("--object-size", type=float, nargs=2, default=(32.0, 72.0), metavar=("MIN", "MAX"),
                        help="shape diameters in pixels")
    parser.add_argument("--style", choices=("plain", "textured"), default="plain",
                        help="plain backgrounds and flat shapes, or the cluttered data the tests use")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, applied to every recipe")


def run(args: argparse.Namespace) -> int:
    from vision.data.synthetic import make_synthetic_dataset

    start = time.monotonic()
    out = Path(args.out)
    data_dir = out / "data"
    steps = [(Path(args.config), args.minutes)]
    if args.mask_minutes != 0:
        steps.append((Path(args.mask_config), args.mask_minutes))
    total = 1 + 3 * len(steps)

    print(f"[1/{total}] synthetic data set -> {data_dir}")
    lo, hi = args.object_size
    classes = int(args.classes) if args.classes.isdigit() else [c.strip() for c in args.classes.split(",")]
    make_synthetic_dataset(
        data_dir, num_train=args.num_train, num_val=args.num_val, image_size=tuple(args.size),
        classes=classes, min_objects=args.objects[0], max_objects=args.objects[1],
        min_object_size=lo, max_object_size=hi, max_occlusion=0.2, style=args.style, seed=0,
    )
    val_folder = _val_folder(data_dir, out / "val_images")

    models: list[dict[str, Any]] = []
    for k, (config, minutes) in enumerate(steps):
        first = 2 + 3 * k
        models.append(_model_step(config, minutes, args.overrides, data_dir, val_folder, out, first, total))

    summary = {"models": models, "seconds": round(time.monotonic() - start, 1)}
    from vision.atomic import atomic_write

    with atomic_write(out / "summary.json", "w") as f:
        f.write(json.dumps(summary, indent=2))
    print(f"\ndemo done in {summary['seconds']:.0f} s on {args.num_val} synthetic validation images:")
    for m in models:
        figures = ", ".join(f"{k} {v:.3f}" for k, v in m["metrics"].items())
        print(f"  {m['name']} ({m['arch']}, {m['backbone']}): {figures}")
        print(f"    run {m['run_dir']}; predictions {m['predictions']}; pictures {m['pictures']}")
    print(f"summary: {out / 'summary.json'}")
    return 0


def _val_folder(data_dir: Path, folder: Path) -> Path:
    """The validation images as a plain folder: what a user points ``vision predict`` at."""
    from vision.data.coco import load_json

    folder.mkdir(parents=True, exist_ok=True)
    for img in load_json(data_dir / "val.json")["images"]:
        target = folder / img["file_name"]
        if not target.exists():
            shutil.copyfile(data_dir / "images" / img["file_name"], target)
    return folder


def _model_step(
    config: Path, minutes: float | None, extra: list[str], data_dir: Path, val_folder: Path, out: Path,
    first: int, total: int,
) -> dict[str, Any]:
    """Train one recipe from scratch, predict on the folder (drawing a few images), score the predictions."""
    from vision.config import load_config
    from vision.tasks.training import train

    overrides = [f"data.root={data_dir}", f"output_dir={out / 'runs'}", *extra]
    if minutes is not None:
        overrides.append(f"train.time_budget_min={minutes}")
    cfg = load_config(config, overrides)
    run_dir = out / "runs" / cfg.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    budget = f", at most {cfg.train.time_budget_min:g} min" if cfg.train.time_budget_min else ""
    print(f"[{first}/{total}] training {cfg.model.arch} ({cfg.model.backbone}) from scratch{budget}")
    result = train(cfg, run_dir)
    print(f"trained {result['iterations']} iterations in {result['seconds']:.0f} s")
    weights = run_dir / "best.pt" if (run_dir / "best.pt").exists() else run_dir / "last.pt"

    pred_dir = out / "predictions" / cfg.name
    print(f"[{first + 1}/{total}] predicting on the folder {val_folder}")
    _predict_folder(weights, val_folder, pred_dir)

    with_masks = cfg.model.arch == "mask_rcnn"
    print(f"[{first + 2}/{total}] evaluating the predictions against the validation set (pycocotools)")
    metrics = _evaluate(data_dir / "val.json", pred_dir, with_masks)
    return {
        "name": cfg.name, "arch": cfg.model.arch, "backbone": cfg.model.backbone, "run_dir": str(run_dir),
        "iterations": result["iterations"], "train_seconds": result["seconds"], "metrics": metrics,
        "predictions": str(pred_dir / "predictions.json"), "pictures": str(pred_dir / "images"),
    }


def _predict_folder(weights: Path, folder: Path, pred_dir: Path) -> None:
    """``vision predict --save-images`` through the Python API: COCO results, images.json, drawings."""
    from vision.api import load

    if pred_dir.exists():
        shutil.rmtree(pred_dir)
    load(weights).predict_folder(folder, pred_dir, save_images=True, progress=False)


def _evaluate(gt_path: Path, pred_dir: Path, with_masks: bool) -> dict[str, float]:
    """Box (and mask) AP of the folder's predictions, matched to the ground truth by file name."""
    from vision.data.coco import load_json
    from vision.metrics.coco import evaluate_coco, format_per_class

    gt = load_json(gt_path)
    gt_ids = {im["file_name"]: im["id"] for im in gt["images"]}
    to_gt = {im["id"]: gt_ids[im["file_name"]] for im in load_json(pred_dir / "images.json")["images"]}
    results = [{**r, "image_id": to_gt[r["image_id"]]} for r in load_json(pred_dir / "predictions.json")]
    figures: dict[str, float] = {}
    for iou_type, prefix in (("bbox", "box"), ("segm", "mask")) if with_masks else (("bbox", "box"),):
        metrics = evaluate_coco(gt, results, iou_type)
        print(metrics["summary"], end="")
        print(format_per_class(metrics["per_class"]))
        figures[f"{prefix}_AP"] = round(float(metrics[iou_type]["AP"]), 4)
        figures[f"{prefix}_AP50"] = round(float(metrics[iou_type]["AP50"]), 4)
    return figures
