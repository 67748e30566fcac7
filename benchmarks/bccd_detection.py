"""BCCD from scratch: vision's Faster R-CNN and RetinaNet recipes against the plain torchvision peer.

Usage:
    python benchmarks/bccd_detection.py [--data ../shared/data/bccd] [--minutes 40]
        [--arch faster_rcnn retinanet] [--peer] [--peer-script ../shared/baselines/bccd_torchvision_baseline.py]
        [--tta] [--weights ARCH=CHECKPOINT ...]

Each recipe (``configs/bccd_<arch>.yaml``) trains on trainval for the same wall-clock budget as the
peer, then the final weights are evaluated on test with pycocotools.  With ``--peer`` the torchvision
baseline runs right after each vision run on the same machine.  One JSON line per run, a table, and
as the last line the ratio of vision's mAP50 to the peer's (or to the peer figures measured on this
machine when the peer is not run).  ``--tta`` also scores the same weights with test-time augmentation
(horizontal flip x scales 0.8, 1.0, 1.2, merged by WBF), a separate row that costs six passes per test
image; ``--weights`` scores existing checkpoints instead of training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# The peer's figures as measured on this machine (40 CPU-minutes, 480 px), used when --peer is not given.
PEER_REFERENCE = {
    "faster_rcnn": {"AP": 0.524, "AP50": 0.897, "per_class_AP50": {"RBC": 0.80, "WBC": 0.95, "Platelets": 0.94}},
    "retinanet": {"AP": 0.143, "AP50": 0.300, "per_class_AP50": {"Platelets": 0.001}},
}


def per_class_ap50(precision, names: list[str]) -> dict[str, float]:
    out = {}
    for k, name in enumerate(names):
        p = precision[0, :, k, 0, -1]
        p = p[p > -1]
        out[name] = float(p.mean()) if p.size else float("nan")
    return out


def evaluate_on_test(weights: Path, data: str, tta: bool = False) -> dict:
    """pycocotools on the test split with the run's final weights (optionally with TTA)."""
    import contextlib
    import io

    import torch
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from vision.config import resolve_path
    from vision.data.coco import to_coco_dict
    from vision.data.image_io import read_image
    from vision.data.voc import read_voc
    from vision.inference.loading import load_model_for_inference
    from vision.inference.predictor import Predictor
    from vision.metrics.coco import prediction_to_results

    model, cfg, categories = load_model_for_inference(weights)
    split = cfg.data.val
    test = read_voc(resolve_path(data, split.ann), resolve_path(data, split.images),
                    ids_file=resolve_path(data, split.ids), class_names=list(categories.names))
    predictor = Predictor(model, categories, device="auto")
    if tta:
        from vision.inference.ensemble import FusionSpec, fuse_predictions
        from vision.inference.tta import TTAPredictor

        predictor = TTAPredictor(predictor, lambda preds, size: fuse_predictions(preds, size, FusionSpec("wbf")))
    results = []
    for record in test.records:
        image = torch.from_numpy(read_image(record.path)).permute(2, 0, 1)
        (pred,) = predictor.predict([image])
        results += prediction_to_results(record.image_id, pred, categories)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = to_coco_dict(test)
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]),
            "per_class_AP50": per_class_ap50(ev.eval["precision"], list(categories.names))}


def run_vision(arch: str, data: str, minutes: float, out: Path, extra: list[str],
               weights: str | None = None) -> tuple[dict, Path]:
    """Train the recipe (or take ``weights``) and score the final weights; returns the row and the weights."""
    from vision.config import load_config
    from vision.tasks.training import train

    t0 = time.time()
    if weights:
        last, iters = Path(weights), "-"
    else:
        cfg = load_config(ROOT / "configs" / f"bccd_{arch}.yaml",
                          [f"data.root={data}", f"train.time_budget_min={minutes}", f"output_dir={out}", *extra])
        iters = train(cfg, out / cfg.name)["iterations"]
        last = out / cfg.name / "last.pt"
    metrics = evaluate_on_test(last, data)
    return {"who": "vision", "arch": arch, "minutes": round((time.time() - t0) / 60, 1),
            "iters": iters, **metrics}, last


def run_peer(arch: str, data: str, minutes: float, script: Path) -> dict:
    proc = subprocess.run([sys.executable, str(script), arch, str(minutes), "480", data],
                          capture_output=True, text=True, check=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    peer = json.loads(line)
    return {"who": "peer", "arch": arch, "minutes": minutes, "iters": peer["iters"], "AP": peer["AP"],
            "AP50": peer["AP50"], "per_class_AP50": peer["per_class_AP50"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "bccd"))
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--arch", nargs="+", default=["faster_rcnn", "retinanet"])
    parser.add_argument("--peer", action="store_true", help="run the torchvision peer after each vision run")
    parser.add_argument("--peer-script", default=str(ROOT.parent / "shared" / "baselines" / "bccd_torchvision_baseline.py"))
    parser.add_argument("--tta", action="store_true", help="also score vision's weights with test-time augmentation")
    parser.add_argument("--weights", nargs="+", default=[], metavar="ARCH=CHECKPOINT",
                        help="score these checkpoints instead of training (e.g. faster_rcnn=runs/x/last.pt)")
    parser.add_argument("--out", default="runs/bench_bccd")
    parser.add_argument("overrides", nargs="*", help="config overrides for vision's recipes")
    args = parser.parse_intermixed_args()

    given = dict(w.split("=", 1) for w in args.weights)
    if set(given) - set(args.arch):
        parser.error(f"--weights for an architecture not in --arch: {sorted(set(given) - set(args.arch))}")
    rows = []
    for arch in args.arch:
        ours, last = run_vision(arch, args.data, args.minutes, Path(args.out), args.overrides, given.get(arch))
        print(json.dumps(ours), flush=True)
        tta = {**ours, "who": "vision +TTA", **evaluate_on_test(last, args.data, tta=True)} if args.tta else None
        if tta:
            print(json.dumps(tta), flush=True)
        peer = run_peer(arch, args.data, args.minutes, Path(args.peer_script)) if args.peer else {
            "who": "peer (reference)", "arch": arch, **PEER_REFERENCE[arch]}
        print(json.dumps(peer), flush=True)
        rows.append((arch, ours, tta, peer))

    print(f"\n{'arch':<12} {'who':<17} {'iters':>6} {'AP':>6} {'AP50':>6}  per-class AP50")
    for arch, *runs in rows:
        for r in filter(None, runs):
            pcs = " ".join(f"{k} {v:.3f}" for k, v in r["per_class_AP50"].items())
            print(f"{arch:<12} {r['who']:<17} {r.get('iters', '-')!s:>6} {r['AP']:6.3f} {r['AP50']:6.3f}  {pcs}")

    def ratio(r: dict, peer: dict) -> str:
        return f"{r['AP50'] / max(peer['AP50'], 1e-9):.2f}x"

    ratios = ", ".join(f"{arch} {ratio(ours, peer)}" + (f" (+TTA {ratio(tta, peer)})" if tta else "")
                       for arch, ours, tta, peer in rows)
    print(f"mAP50 ratio vision/peer: {ratios}")

if __name__ == "__main__":
    main()
