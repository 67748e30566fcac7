"""``vision demo``: the whole loop on embedded data, in a few CPU minutes.

Makes the synthetic shapes data set, trains a small RetinaNet from scratch, evaluates it with
pycocotools on the validation split, predicts on a folder of images and says where everything is;
then trains and evaluates a small Mask R-CNN (box and mask AP) on the same data.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_retinanet.yaml"
MASK_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_mask_rcnn.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="folder for the data, the run and the predictions")
    parser.add_argument("--config", default=str(CONFIG), help="training recipe")
    parser.add_argument("--minutes", type=float, default=None, help="training time budget (default: the recipe's)")
    parser.add_argument(
        "--mask-minutes", type=float, default=None,
        help="Mask R-CNN training budget (default: its recipe's; 0 skips the Mask R-CNN step)",
    )
    parser.add_argument("--num-train", type=int, default=240)
    parser.add_argument("--size", type=int, nargs=2, default=(192, 144), metavar=("W", "H"), help="synthetic image size")
    parser.add_argument("--classes", type=int, default=4, help="how many shape classes")
    parser.add_argument("--num-val", type=int, default=60)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")


def run(args: argparse.Namespace) -> int:
    from vision.api import load
    from vision.config import load_config
    from vision.data.coco import load_json
    from vision.data.synthetic import make_synthetic_dataset
    from vision.metrics.coco import evaluate_coco, format_per_class
    from vision.tasks.training import train

    out = Path(args.out)
    data_dir, pred_dir = out / "data", out / "predictions"
    overrides = [f"data.root={data_dir}", f"output_dir={out / 'runs'}", *args.overrides]
    if args.minutes is not None:
        overrides.append(f"train.time_budget_min={args.minutes}")
    cfg = load_config(args.config, overrides)

    print(f"[1/5] synthetic data set -> {data_dir}")
    make_synthetic_dataset(
        data_dir, num_train=args.num_train, num_val=args.num_val, image_size=tuple(args.size), classes=args.classes,
        seed=0,
    )

    print(f"[2/5] training {cfg.model.arch} ({cfg.model.backbone}) from scratch")
    run_dir = out / "runs" / cfg.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    train(cfg, run_dir)
    weights = run_dir / "best.pt" if (run_dir / "best.pt").exists() else run_dir / "last.pt"

    print("[3/5] predicting on the validation images folder")
    model = load(weights)
    val_names = [img["file_name"] for img in load_json(data_dir / "val.json")["images"]]
    folder = out / "val_images"
    folder.mkdir(parents=True, exist_ok=True)
    for name in val_names:
        target = folder / name
        if not target.exists():
            shutil.copyfile(data_dir / "images" / name, target)
    if pred_dir.exists():
        shutil.rmtree(pred_dir)
    model.predict_folder(folder, pred_dir, save_images=True)

    print("[4/5] evaluating the predictions against the validation set (pycocotools)")
    gt = load_json(data_dir / "val.json")
    gt_ids = {im["file_name"]: im["id"] for im in gt["images"]}
    pred_images = load_json(pred_dir / "images.json")["images"]
    to_gt = {im["id"]: gt_ids[im["file_name"]] for im in pred_images}
    results = [{**r, "image_id": to_gt[r["image_id"]]} for r in load_json(pred_dir / "predictions.json")]
    metrics = evaluate_coco(gt, results)
    print(metrics["summary"], end="")
    print(format_per_class(metrics["per_class"]))
    m = metrics["bbox"]
    print(
        f"demo done: box AP {m['AP']:.3f}, AP50 {m['AP50']:.3f} on {len(gt['images'])} synthetic val images; "
        f"run {run_dir}, predictions {pred_dir / 'predictions.json'}, drawings {pred_dir / 'images'}"
    )
    if args.mask_minutes != 0:
        _mask_rcnn_step(args, data_dir, out)
    return 0


def _mask_rcnn_step(args: argparse.Namespace, data_dir: Path, out: Path) -> None:
    """A small Mask R-CNN on the same data: the trainer's final evaluation gives box and mask AP."""
    from vision.config import load_config
    from vision.tasks.training import train

    overrides = [f"data.root={data_dir}", f"output_dir={out / 'runs'}"]
    if args.mask_minutes is not None:
        overrides.append(f"train.time_budget_min={args.mask_minutes}")
    cfg = load_config(MASK_CONFIG, overrides)
    run_dir = out / "runs" / cfg.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    print(f"[5/5] training and evaluating {cfg.model.arch} ({cfg.model.backbone}) from scratch")
    metrics = train(cfg, run_dir)["metrics"] or {}
    print(metrics.get("summary", {}).get("segm", ""), end="")
    box, mask = metrics.get("bbox", {}), metrics.get("segm", {})
    print(
        f"mask R-CNN done: box AP {box.get('AP', float('nan')):.3f}, mask AP {mask.get('AP', float('nan')):.3f}, "
        f"mask AP50 {mask.get('AP50', float('nan')):.3f}; run {run_dir}"
    )

