"""Prediction as the user runs it: ``vision predict`` against a plain torchvision script, whole processes.

Usage:
    python benchmarks/predict_cli.py [--data ../shared/data/raccoon/images] [--images 64]
        [--rounds 1] [--single-rounds 3] [--arch retinanet] [--keep DIR]

Both sides get the same torchvision ``*_resnet50_fpn`` weights (``speed.torchvision_model``: random
weights, batch-norm statistics as a trained network has them), saved as a plain state_dict, and 800 px
on the short side.  Each side runs as a fresh process, imports and model loading included:

- the reference is what a torchvision user writes: build the detector, ``load_state_dict``, then for
  each file ``decode_image``, the model on that one image under ``inference_mode``, the detections into
  a COCO results list, ``json.dump`` at the end;
- vision is ``vision predict --weights W --config configs/<arch>_r50_fpn.yaml --source FOLDER --out DIR``
  with its defaults (float32, decoding in worker processes).

Two cases: the first ``--images`` photos of the folder (the raccoon photos come in 47 sizes), best of
``--rounds``; and one photo (the folder's first), best of ``--single-rounds``.  The two sides' detections
are compared image by image: of the reference's top 20 per image, how many vision reports with the same
label and a box within a pixel, and their largest score difference.  The last line gives both ratios,
reference seconds / vision seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

FACTORIES = {"retinanet": "retinanet_resnet50_fpn", "faster_rcnn": "fasterrcnn_resnet50_fpn",
             "mask_rcnn": "maskrcnn_resnet50_fpn"}

REFERENCE_SCRIPT = '''
import json, sys
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.models.detection import {factory}

weights, folder, out = sys.argv[1:4]
model = {factory}(weights=None, weights_backbone=None)
model.load_state_dict(torch.load(weights, weights_only=True))
model.eval()
paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in {{".jpg", ".jpeg", ".png"}})
results = []
with torch.inference_mode():
    for path in paths:
        image = decode_image(str(path), mode=ImageReadMode.RGB).float() / 255
        det = model([image])[0]
        for (x0, y0, x1, y1), score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
            results.append({{"file_name": path.name, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": score}})
Path(out).write_text(json.dumps(results))
print(f"predicted {{len(paths)}} images, {{len(results)}} detections")
'''


def save_weights(arch: str, path: Path) -> None:
    import torch
    from speed import torchvision_model

    torch.save(torchvision_model(arch).state_dict(), path)


def copy_photos(source: Path, folder: Path, n: int) -> None:
    photos = sorted(p for p in source.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:n]
    if len(photos) < n:
        raise SystemExit(f"{source}: {len(photos)} photos, fewer than --images {n}")
    folder.mkdir(parents=True)
    for p in photos:
        shutil.copyfile(p, folder / p.name)


def _environment() -> dict[str, str]:
    """The user's environment: byte-code written as a fresh install writes it."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_environment(), capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[1]} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return seconds


def reference_detections(path: Path) -> dict[str, list[dict]]:
    by_file: dict[str, list[dict]] = {}
    for r in json.loads(path.read_text()):
        by_file.setdefault(r["file_name"], []).append(r)
    return by_file


def vision_detections(out: Path) -> dict[str, list[dict]]:
    names = {im["id"]: im["file_name"] for im in json.loads((out / "images.json").read_text())["images"]}
    by_file: dict[str, list[dict]] = {}
    for r in json.loads((out / "predictions.json").read_text()):
        by_file.setdefault(Path(names[r["image_id"]]).name, []).append(r)
    return by_file


def agreement(ours: dict[str, list[dict]], ref: dict[str, list[dict]], top: int = 20) -> tuple[int, int, float]:
    """(found, looked for, largest score difference) over each image's top ``top`` reference detections."""
    found = wanted = 0
    worst = 0.0
    for name, dets in ref.items():
        candidates = ours.get(name, [])
        for r in sorted(dets, key=lambda d: -d["score"])[:top]:
            wanted += 1
            same = [o for o in candidates if o["category_id"] == r["category_id"]
                    and max(abs(a - b) for a, b in zip(o["bbox"], r["bbox"])) <= 1.0]
            if same:
                found += 1
                worst = max(worst, min(abs(o["score"] - r["score"]) for o in same))
    return found, wanted, worst


def run_case(label: str, folder: Path, weights: Path, script: Path, config: Path, tmp: Path, rounds: int) -> float:
    ref_times, ours_times = [], []
    for k in range(rounds):
        ref_out = tmp / f"{label.replace(' ', '_')}_ref{k}.json"
        ours_out = tmp / f"{label.replace(' ', '_')}_vision{k}"
        shutil.rmtree(ours_out, ignore_errors=True)  # a fresh run: an output folder left there would resume
        ref_times.append(timed([sys.executable, str(script), str(weights), str(folder), str(ref_out)]))
        ours_times.append(timed([sys.executable, "-m", "vision", "predict", "--weights", str(weights),
                                 "--config", str(config), "--source", str(folder), "--out", str(ours_out),
                                 "model.bn_eps=1e-5", "model.pretrained=null"]))
        print(f"  {label} round {k + 1}: torchvision {ref_times[-1]:.1f} s, vision {ours_times[-1]:.1f} s", flush=True)
    found, wanted, worst = agreement(vision_detections(ours_out), reference_detections(ref_out))
    n = len(list(folder.iterdir()))
    ref_s, ours_s = min(ref_times), min(ours_times)
    print(f"{label}: {n} photos, torchvision {ref_s:.1f} s ({ref_s / n:.2f} s/image), vision {ours_s:.1f} s "
          f"({ours_s / n:.2f} s/image): {ref_s / ours_s:.2f}x; top-20 detections found {found}/{wanted}, "
          f"largest score difference {worst:.2e}", flush=True)
    return ref_s / ours_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "raccoon" / "images"))
    ap.add_argument("--images", type=int, default=64, help="photos in the folder case (0: one photo only)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of the folder case per side (best is kept)")
    ap.add_argument("--single-rounds", type=int, default=3, help="runs of the one-photo case per side")
    ap.add_argument("--arch", default="retinanet", choices=sorted(FACTORIES))
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        weights, script = tmp / f"{args.arch}_r50_fpn.pth", tmp / "torchvision_predict.py"
        config = ROOT / "configs" / f"{args.arch}_r50_fpn.yaml"
        save_weights(args.arch, weights)
        script.write_text(REFERENCE_SCRIPT.format(factory=FACTORIES[args.arch]))
        for sub in ("folder", "one"):
            shutil.rmtree(tmp / sub, ignore_errors=True)
        copy_photos(Path(args.data), tmp / "one", 1)
        single = run_case("one photo", tmp / "one", weights, script, config, tmp, args.single_rounds)
        if args.images:
            copy_photos(Path(args.data), tmp / "folder", args.images)
            folder = run_case("folder", tmp / "folder", weights, script, config, tmp, args.rounds)
    folder_part = f"folder of {args.images} {folder:.2f}x, " if args.images else ""
    print(f"vision predict / torchvision script, whole processes: {folder_part}one photo {single:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
