"""Does ensembling pay on real data?  Three BCCD detectors, alone and fused, scored on BCCD test.

Usage:
    python benchmarks/ensemble_bccd.py [--data ../shared/data/bccd] [--minutes 20 | --iters 900]
        [--seeds 0 1 2] [--backbones resnet18 resnet18 resnet18] [--weights A.pt B.pt C.pt]
        [--out runs/ensemble_bccd]

Without ``--weights`` each detector is trained with ``configs/bccd_faster_rcnn.yaml`` for ``--minutes``
of wall clock, or for ``--iters`` iterations (members of equal strength whatever else the machine is
doing; 900 is about 20 minutes on two quiet cores), each with its own seed, and its own backbone where
``--backbones`` is given, by ``vision.engine.trainer.train``.
Every model predicts each test image once; the ensemble fuses those same predictions with each
method of ``vision.ensemble`` (the path ``vision predict --weights A B C --fusion M`` takes), so the
comparison is of fusion alone.  Prints mAP and mAP50 per model and per fusion method; the last line
is the mAP50 gain of WBF over the best single model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

METHODS = ("nms", "soft_nms", "wbf", "sum")


def train_model(data: str, minutes: float, iters: int | None, seed: int, backbone: str | None, out: Path) -> Path:
    """One detector from the BCCD recipe; returns its final checkpoint."""
    from vision.config import load_config
    from vision.tasks.training import train

    budget = [f"train.max_iters={iters}", "train.time_budget_min=null"] if iters else [f"train.time_budget_min={minutes}"]
    overrides = [f"data.root={data}", *budget, f"train.seed={seed}", "train.log_every=5", f"name=bccd_ens_seed{seed}"]
    if backbone:
        overrides.append(f"model.backbone={backbone}")
    cfg = load_config(ROOT / "configs" / "bccd_faster_rcnn.yaml", overrides)
    run_dir = out / f"seed{seed}_{cfg.model.backbone}"
    t0 = time.time()
    train(cfg, run_dir)
    print(f"trained seed {seed} ({cfg.model.backbone}) in {(time.time() - t0) / 60:.1f} min -> {run_dir}", flush=True)
    return run_dir / "last.pt"


def test_set(data: str, weights: Path):
    from vision.config import resolve_path
    from vision.data.voc import read_voc
    from vision.inference.loading import load_model_for_inference

    _, cfg, categories = load_model_for_inference(weights)
    split = cfg.data.val
    return read_voc(resolve_path(data, split.ann), resolve_path(data, split.images),
                    ids_file=resolve_path(data, split.ids), class_names=list(categories.names))


def predict_all(weights: Path, records) -> tuple[list[dict], object]:
    """One prediction per test image (pixels, labels 1..K)."""
    import torch

    from vision.data.image_io import read_image
    from vision.inference.loading import load_model_for_inference
    from vision.inference.predictor import Predictor

    model, _, categories = load_model_for_inference(weights)
    predictor = Predictor(model, categories, device="auto")
    preds = []
    for record in records:
        image = torch.from_numpy(read_image(record.path)).permute(2, 0, 1)
        (pred,) = predictor.predict([image])
        preds.append(pred)
    return preds, categories


def score(gt: dict, records, preds: list[dict], categories) -> tuple[float, float]:
    from vision.metrics.coco import evaluate_coco, prediction_to_results

    results = [r for rec, p in zip(records, preds) for r in prediction_to_results(rec.image_id, p, categories)]
    stats = evaluate_coco(gt, results)["bbox"]
    return stats["AP"], stats["AP50"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "bccd"))
    ap.add_argument("--minutes", type=float, default=20.0, help="training budget per model (wall clock)")
    ap.add_argument("--iters", type=int, help="training budget per model in iterations (instead of --minutes)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--backbones", nargs="+", help="one timm backbone per model (default: the recipe's)")
    ap.add_argument("--weights", nargs="+", help="use these checkpoints instead of training")
    ap.add_argument("--out", default=str(ROOT / "runs" / "ensemble_bccd"))
    args = ap.parse_args(argv)

    from vision.data.coco import to_coco_dict
    from vision.inference.ensemble import FusionSpec, fuse_predictions

    if args.weights:
        weights = [Path(w) for w in args.weights]
    else:
        backbones = args.backbones or [None] * len(args.seeds)
        if len(backbones) != len(args.seeds):
            ap.error("give one --backbones entry per seed")
        weights = [train_model(args.data, args.minutes, args.iters, s, b, Path(args.out)) for s, b in zip(args.seeds, backbones)]

    test = test_set(args.data, weights[0])
    gt = to_coco_dict(test)
    per_model = []
    best50 = 0.0
    for w in weights:
        preds, categories = predict_all(w, test.records)
        per_model.append(preds)
        ap_all, ap50 = score(gt, test.records, preds, categories)
        best50 = max(best50, ap50)
        print(f"model {w}: mAP {ap_all:.4f}  mAP50 {ap50:.4f}", flush=True)
    fused50 = {}
    for method in METHODS:
        fused = [
            fuse_predictions([p[i] for p in per_model], (rec.height, rec.width), FusionSpec(method))
            for i, rec in enumerate(test.records)
        ]
        ap_all, ap50 = score(gt, test.records, fused, categories)
        fused50[method] = ap50
        print(f"fusion {method}: mAP {ap_all:.4f}  mAP50 {ap50:.4f}  ({ap50 - best50:+.4f} vs best single)", flush=True)
    print(f"WBF mAP50 {fused50['wbf']:.4f} vs best single {best50:.4f}: gain {fused50['wbf'] - best50:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
