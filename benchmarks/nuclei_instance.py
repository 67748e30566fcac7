"""Nuclei instance segmentation from scratch: vision's Mask R-CNN recipe against the torchvision peer.

Usage:
    python benchmarks/nuclei_instance.py [DATA] [--minutes 60] [--peer] [--val-images N]
        [--peer-script ../shared/baselines/nuclei_torchvision_baseline.py] [key=value ...]

Trains ``configs/nuclei_mask_rcnn.yaml`` on train.json for a wall-clock budget, then evaluates the
final weights on val.json with pycocotools, box and mask, with up to 400 detections per image (images
hold up to 375 nuclei).  Each validation image's masks are turned into COCO RLE as soon as it is
predicted: full-image float masks of 400 detections take up to a gigabyte per image, so holding them for
the whole split, as the generic evaluation does, does not fit in memory here.  Prints one JSON line per
run and, as the last line, vision's mask AP50 against the peer's (run with ``--peer``, else the figure
measured on this machine) and against the target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# The peer measured on this machine (30 CPU-minutes, 512 px), used when --peer is not given.
PEER_REFERENCE = {"bbox": {"AP50": 0.136}, "segm": {"AP50": 0.165}}
TARGET_MASK_AP50 = 0.60
MAX_DETS = 400


def predict_results(model, dataset, det_set, device, *, batch_size: int = 2, num_workers: int = 0,
                    amp: bool = False, show_progress: bool = True) -> dict[int, list[dict[str, Any]]]:
    """``{image_id: COCO results}``: the trainer's prediction, one batch at a time, encoded at once."""
    from torch.utils.data import Subset
    from tqdm import tqdm

    from vision.metrics.coco import prediction_to_results
    from vision.tasks.detection import predict_dataset

    out: dict[int, list[dict[str, Any]]] = {}
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="eval", disable=not show_progress, leave=False):
        chunk = Subset(dataset, range(start, min(start + batch_size, len(dataset))))
        preds = predict_dataset(model, chunk, det_set, device, batch_size=batch_size, num_workers=0, amp=amp,
                                show_progress=False)
        for image_id, pred in preds.items():
            out[image_id] = prediction_to_results(image_id, pred, det_set.categories)
    return out


def evaluate_results(det_set, predictions: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Box and mask AP with pycocotools, up to ``MAX_DETS`` detections per image."""
    from vision.data.coco import to_coco_dict
    from vision.metrics.coco import evaluate_coco

    gt = to_coco_dict(det_set)
    results = [r for rs in predictions.values() for r in rs]
    metrics: dict[str, Any] = {"num_results": len(results)}
    for iou_type in ("bbox", "segm"):
        metrics[iou_type] = evaluate_coco(gt, results, iou_type, max_dets=MAX_DETS)[iou_type]
    return metrics


def mask_ap50(metrics: dict[str, Any] | None) -> float:
    return float((metrics or {}).get("segm", {}).get("AP50", float("nan")))


def run_vision(data: str, minutes: float, out: Path, extra: list[str], val_images: int | None = None) -> dict[str, Any]:
    from vision.config import load_config
    from vision.engine.seeding import setup_runtime
    from vision.engine.trainer import Trainer
    from vision.models import build_model
    from vision.tasks import task_for

    cfg = load_config(ROOT / "configs" / "nuclei_mask_rcnn.yaml",
                      [f"data.root={data}", f"train.time_budget_min={minutes}", f"output_dir={out}", *extra])
    t0 = time.time()
    setup_runtime(cfg)
    spec = task_for(cfg)
    task = spec.training_data()
    if val_images:  # a quick check of the whole path, not a benchmark figure
        task.val_set.records = task.val_set.records[:val_images]
    task.val_dataset.with_masks = False  # prediction needs the images only; COCOeval reads the masks itself
    model = build_model(cfg.model)
    trainer = Trainer(
        cfg, out / cfg.name, model=model, train_set=task.train_set, train_dataset=task.train_dataset,
        val_set=task.val_set, val_dataset=task.val_dataset, collate_fn=spec.collate,
        predict_fn=predict_results, evaluator=evaluate_results, score_fn=mask_ap50, score_name="mask AP50",
    )
    summary = trainer.fit()  # the final evaluation is of the final weights
    m = summary["metrics"]
    return {"who": "vision", "minutes": round((time.time() - t0) / 60, 1), "iters": summary["iterations"],
            "epochs": round(summary["epochs"], 2), "val_images": len(task.val_set), "bbox": {k: m["bbox"][k] for k in ("AP", "AP50")},
            "segm": {k: m["segm"][k] for k in ("AP", "AP50")}}


def memory_check(data: str, extra: list[str]) -> dict[str, Any]:
    """Peak memory of a training step and a prediction on the most crowded training image, at the recipe size."""
    import resource

    import torch

    from vision.config import load_config
    from vision.data.build import read_split
    from vision.data.dataset import DetectionDataset
    from vision.data.transforms import build_train_transform
    from vision.models import build_model

    def peak_gb() -> float:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)

    cfg = load_config(ROOT / "configs" / "nuclei_mask_rcnn.yaml", [f"data.root={data}", *extra])
    train_set = read_split(cfg.data.train, cfg.data.root)
    k = max(range(len(train_set)), key=lambda i: len(train_set.records[i]))
    record = train_set.records[k]
    cfg.model.num_classes = len(train_set.categories)
    model = build_model(cfg.model)
    image, target = DetectionDataset(train_set, build_train_transform(cfg.data.augment), with_masks=True)[k]
    out: dict[str, Any] = {"image": record.file_name, "size": [record.width, record.height],
                           "instances": len(record), "after_loading_gb": peak_gb()}
    model.train()
    losses = model([image, image], [target, target])  # a batch of two such images
    sum(losses.values()).backward()
    out["after_train_step_gb"] = peak_gb()
    model.eval()
    with torch.no_grad():
        (pred,) = model([image])
    out.update(after_prediction_gb=peak_gb(), detections=len(pred["boxes"]))
    return out


def run_peer(data: str, script: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(script), "30", "512", data], capture_output=True, text=True, check=True)
    peer = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    return {"who": "peer", "minutes": peer["minutes"], "iters": peer["iters"], "bbox": peer["bbox"], "segm": peer["segm"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--peer", action="store_true", help="also run the torchvision peer (30 minutes, 512 px)")
    parser.add_argument("--peer-script", default=str(ROOT.parent / "shared" / "baselines" / "nuclei_torchvision_baseline.py"))
    parser.add_argument("--out", default="runs/bench_nuclei")
    parser.add_argument("--val-images", type=int, help="evaluate on the first N val images only (smoke runs)")
    parser.add_argument("--memory-check", action="store_true",
                        help="only measure peak memory of one train step and one prediction on the most crowded image")
    parser.add_argument("args", nargs="*", metavar="DATA | key=value",
                        help="the nuclei folder (default /work/shared/data/nuclei) and config overrides")
    args = parser.parse_intermixed_args()
    args.overrides = [a for a in args.args if "=" in a]
    folders = [a for a in args.args if "=" not in a]
    args.data = folders[0] if folders else "/work/shared/data/nuclei"

    if args.memory_check:
        print(json.dumps(memory_check(args.data, args.overrides)))
        return
    ours = run_vision(args.data, args.minutes, Path(args.out), args.overrides, args.val_images)
    print(json.dumps(ours), flush=True)
    peer = run_peer(args.data, Path(args.peer_script)) if args.peer else {"who": "peer (reference)", **PEER_REFERENCE}
    print(json.dumps(peer), flush=True)
    for r in (ours, peer):
        b, s = r["bbox"], r["segm"]
        print(f"{r['who']:<17} box AP {b.get('AP', float('nan')):.3f} AP50 {b['AP50']:.3f}   "
              f"mask AP {s.get('AP', float('nan')):.3f} AP50 {s['AP50']:.3f}")
    ratio = ours["segm"]["AP50"] / max(peer["segm"]["AP50"], 1e-9)
    print(f"mask AP50 {ours['segm']['AP50']:.3f}: {ratio:.2f}x the peer's {peer['segm']['AP50']:.3f}, "
          f"target {TARGET_MASK_AP50:.2f} ({'met' if ours['segm']['AP50'] >= TARGET_MASK_AP50 else 'not met'}, "
          f"{args.minutes:g} min)")


if __name__ == "__main__":
    main()
