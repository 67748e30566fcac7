"""Long-tail sampling and detection AutoAugment: the same detector, the same number of steps, several ways.

Usage:
    python benchmarks/longtail.py [--steps 600] [--long-tail 100] [--rarest-images 20]
        [--bccd ../shared/data/bccd] [--bccd-steps 600] [--only synthetic|bccd]
        [--autoaugment both|off|on] [--samplers NAME,NAME] [key=value ...]

Trains a small Faster R-CNN with ``data.sampler`` uniform, class_balanced (fully balanced, and softened to
square-root sampling with ``data.class_power=0.5``) and repeat_factor, each with
and without AutoAugment v0, on (1) a synthetic shapes set whose class frequencies span ``--long-tail``
to 1 (one class per image; the validation split balanced, so every class's AP rests on about as many
instances; the training split as large as it takes for the rarest class to appear in ``--rarest-images``
images) and (2) BCCD (RBC outnumbers the others about 11 to 1).  Prints per-class
AP and mAP for every run, then, as the last line, the rarest synthetic class's AP gain of
class-balanced (full and square-root) over uniform sampling (without AutoAugment) and the mAP changes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Each run's sampler settings; class_balanced_sqrt softens the balance to square-root sampling.
SAMPLERS = {
    "uniform": ["data.sampler=uniform"],
    "class_balanced": ["data.sampler=class_balanced"],
    "class_balanced_sqrt": ["data.sampler=class_balanced", "data.class_power=0.5"],
    "repeat_factor": ["data.sampler=repeat_factor"],
}

SYNTHETIC_RECIPE = [
    "model.arch=faster_rcnn", "model.backbone=resnet18", "model.fpn_channels=64", "model.min_size=[192]",
    "model.max_size=256", "model.anchor_sizes=[[16],[32],[64],[128],[256]]", "model.score_thresh=0.01",
    "data.train.ann=train.json", "data.train.images=images", "data.val.ann=val.json", "data.val.images=images",
    "data.batch_size=4", "data.num_workers=2", "data.augment.hflip=0.5",
    "train.optimizer=adamw", "train.lr=0.0006", "train.weight_decay=0.05", "train.warmup_iters=50",
    "train.schedule=cosine", "train.clip_grad=10", "train.eval_every=0", "train.ckpt_every_iters=100000",
    "data.repeat_threshold=0.1",
]


def sampler_list(text: str) -> list[str]:
    """``--samplers`` takes one comma-separated word, so the config overrides after it stay overrides."""
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown sampler {unknown or text!r}: expected some of {', '.join(SAMPLERS)}")
    return names


def run_one(cfg_path: str | None, overrides: list[str], out: Path) -> dict:
    from vision.config import load_config
    from vision.tasks.training import train

    cfg = load_config(cfg_path, overrides)
    summary = train(cfg, out)
    metrics = summary["metrics"] or {}
    return {"mAP": metrics.get("bbox", {}).get("AP", float("nan")), "per_class": metrics.get("per_class", {})}


def table(title: str, rows: dict[str, dict]) -> None:
    names = list(next(iter(rows.values()))["per_class"])
    print(f"\n{title}")
    print(f"{'run':<28} {'mAP':>6}  " + " ".join(f"{n[:10]:>10}" for n in names))
    for run, r in rows.items():
        print(f"{run:<28} {r['mAP']:6.3f}  " + " ".join(f"{r['per_class'].get(n, float('nan')):10.3f}" for n in names))


def train_images_for(rarest_images: int, long_tail: float) -> int:
    """Training-split size at which the rarest class appears in ``rarest_images`` images.

    A sampler can only re-weight what the data holds: with a handful of images of the rarest class the
    comparison measures few-shot memorisation, not sampling, so the set grows with the tail instead.
    """
    from vision.data.synthetic import DEFAULT_CLASSES, class_weights

    weights = class_weights(len(DEFAULT_CLASSES), long_tail)
    return math.ceil(rarest_images * weights.sum() / weights.min())


def synthetic_runs(args: argparse.Namespace, out: Path) -> tuple[dict[str, dict], str]:
    from vision.data.synthetic import make_synthetic_dataset

    data = out / "synthetic_longtail"
    num_train = train_images_for(args.rarest_images, args.long_tail)
    # validation is balanced: with the training split's long tail the rarest class would have two val instances
    info = make_synthetic_dataset(data, num_train=num_train, num_val=180, image_size=(256, 192),
                                  long_tail=args.long_tail, balanced_val=True, one_class_per_image=True, seed=0)
    counts = info["counts"]["train"]
    rows = {}
    for aa in args.aa_modes:
        for sampler in args.samplers:
            name = f"{sampler}{' +AA v0' if aa else ''}"
            extra = [f"data.root={data}", *SAMPLERS[sampler], f"train.max_iters={args.steps}",
                     f"name=lt_{sampler}_{int(aa)}"]
            if aa:
                extra += ["data.augment.autoaugment=v0", "data.augment.autoaugment_reference_size=640"]
            rows[name] = run_one(None, SYNTHETIC_RECIPE + extra + args.overrides, out / f"synthetic_{sampler}_{int(aa)}")
            print(json.dumps({"set": "synthetic", "run": name, **rows[name]}), flush=True)
    rarest = list(next(iter(rows.values()))["per_class"])[-1]  # classes are ordered most to least frequent
    print(f"synthetic training split: {num_train} images; instances per class: {counts}")
    return rows, rarest


def bccd_runs(args: argparse.Namespace, out: Path) -> dict[str, dict]:
    rows = {}
    for aa in args.aa_modes:
        for sampler in args.samplers:
            name = f"{sampler}{' +AA v0' if aa else ''}"
            extra = [f"data.root={args.bccd}", *SAMPLERS[sampler], f"train.max_iters={args.bccd_steps}",
                     "train.time_budget_min=null", "train.eval_every=0", f"name=bccd_{sampler}_{int(aa)}"]
            if aa:
                extra += ["data.augment.autoaugment=v0"]
            rows[name] = run_one(str(ROOT / "configs" / "bccd_faster_rcnn.yaml"), extra + args.overrides, out / f"bccd_{sampler}_{int(aa)}")
            print(json.dumps({"set": "bccd", "run": name, **rows[name]}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--long-tail", type=float, default=100.0)
    parser.add_argument("--rarest-images", type=int, default=20,
                        help="training images holding the rarest synthetic class; sets the training split's size")
    parser.add_argument("--bccd", default=str(ROOT.parent / "shared" / "data" / "bccd"))
    parser.add_argument("--bccd-steps", type=int, default=600)
    parser.add_argument("--only", choices=("synthetic", "bccd"))
    parser.add_argument("--autoaugment", choices=("both", "off", "on"), default="both",
                        help="runs without AutoAugment, with it, or both (the two halves can run side by side)")
    parser.add_argument("--samplers", type=sampler_list, default=list(SAMPLERS),
                        help=f"comma-separated subset of {', '.join(SAMPLERS)}")
    parser.add_argument("--out", default="runs/bench_longtail")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.amp=true")
    args = parser.parse_intermixed_args()
    args.aa_modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.autoaugment]
    out = Path(args.out)

    syn, rarest = ({}, None) if args.only == "bccd" else synthetic_runs(args, out)
    bccd = {} if args.only == "synthetic" or not Path(args.bccd).is_dir() else bccd_runs(args, out)
    if syn:
        table(f"synthetic long tail {args.long_tail:g}:1, {args.steps} steps (AP per class, most to least frequent)", syn)
    if bccd:
        table(f"BCCD, {args.bccd_steps} steps (AP per class)", bccd)
    suffix = "" if "uniform" in syn else " +AA v0"
    if f"uniform{suffix}" in syn:
        u = syn[f"uniform{suffix}"]
        parts = []
        for variant in ("class_balanced", "class_balanced_sqrt"):
            if f"{variant}{suffix}" in syn:
                cb = syn[f"{variant}{suffix}"]
                gain = (cb["per_class"][rarest] - u["per_class"][rarest]) * 100
                parts.append(f"{variant} {gain:+.1f} points (mAP {(cb['mAP'] - u['mAP']) * 100:+.1f})")
        print(f"rarest class ({rarest}) AP gain vs uniform{suffix}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
