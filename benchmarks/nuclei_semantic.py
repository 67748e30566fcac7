"""Nuclei as semantic segmentation (nucleus vs background) from scratch: mIoU and nucleus IoU on val.

Usage:
    python benchmarks/nuclei_semantic.py [DATA] [--minutes 30] [--val-images N] [key=value ...]

Trains ``configs/nuclei_semantic.yaml`` on train.json for a wall-clock budget; the trainer's final
evaluation (of the final weights, on val.json) gives the figures.  Prints one JSON line and, as the last
line, the nucleus IoU against the target.  The torchvision peer is an instance model with no semantic
output, so there is no peer figure to compare with here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

TARGET_NUCLEUS_IOU = 0.75


def run_vision(data: str, minutes: float, out: Path, extra: list[str], val_images: int | None = None) -> dict[str, Any]:
    from vision.config import load_config
    from vision.engine.seeding import setup_runtime
    from vision.engine.trainer import Trainer
    from vision.models import build_model
    from vision.tasks import task_for

    cfg = load_config(ROOT / "configs" / "nuclei_semantic.yaml",
                      [f"data.root={data}", f"train.time_budget_min={minutes}", f"output_dir={out}", *extra])
    t0 = time.time()
    setup_runtime(cfg)
    spec = task_for(cfg)
    task = spec.training_data()
    if val_images:  # a quick check of the whole path, not a benchmark figure
        task.val_set.items = task.val_set.items[:val_images]
    trainer = Trainer(
        cfg, out / cfg.name, model=build_model(cfg.model), train_set=task.train_set,
        train_dataset=task.train_dataset, val_set=task.val_set, val_dataset=task.val_dataset,
        collate_fn=spec.collate, predict_fn=spec.predict_dataset, evaluator=spec.evaluate, score_fn=spec.score,
        score_name=spec.metric,
    )
    summary = trainer.fit()
    m = summary["metrics"]
    return {"who": "vision", "minutes": round((time.time() - t0) / 60, 1), "iters": summary["iterations"],
            "epochs": round(summary["epochs"], 2), "val_images": len(task.val_set), "mIoU": m["mIoU"],
            "nucleus_IoU": m["per_class_iou"]["nucleus"], "pixel_accuracy": m["pixel_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--out", default="runs/bench_nuclei_semantic")
    parser.add_argument("--val-images", type=int, help="evaluate on the first N val images only (smoke runs)")
    parser.add_argument("args", nargs="*", metavar="DATA | key=value",
                        help="the nuclei folder (default /work/shared/data/nuclei) and config overrides")
    args = parser.parse_intermixed_args()
    args.overrides = [a for a in args.args if "=" in a]
    folders = [a for a in args.args if "=" not in a]
    args.data = folders[0] if folders else "/work/shared/data/nuclei"

    ours = run_vision(args.data, args.minutes, Path(args.out), args.overrides, args.val_images)
    print(json.dumps(ours), flush=True)
    print(f"mIoU {ours['mIoU']:.3f}, pixel accuracy {ours['pixel_accuracy']:.3f} on {ours['val_images']} val images")
    met = "met" if ours["nucleus_IoU"] >= TARGET_NUCLEUS_IOU else "not met"
    print(f"nucleus IoU {ours['nucleus_IoU']:.3f} vs target {TARGET_NUCLEUS_IOU:.2f} ({met}, {args.minutes:g} min)")


if __name__ == "__main__":
    main()
