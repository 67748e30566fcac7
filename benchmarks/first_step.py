"""Time to the first training step on a large data set: ``vision train`` against a plain torchvision start.

Usage:
    python benchmarks/first_step.py [--images 20000] [--size 640 480] [--keep DIR]

Writes a COCO set of ``--images`` distinct JPEG files (the synthetic shapes; the pixels of 200 generated
images repeat under new names, with their annotations, so writing 20,000 files takes seconds), then
times, as whole processes from launch to the end of the first optimizer step:

- the reference, what a torchvision user writes: ``CocoDetection`` + ``wrap_dataset_for_transforms_v2``,
  a ``DataLoader`` (2 workers, shuffled), ``retinanet_resnet50_fpn`` (no weights), one SGD step;
- ``vision train`` of the same model and input size (``max_iters=1``), first run: it reads the
  annotations, checks every image's header and end marker (``vision.data.image_check``) and caches
  the verdicts beside the annotations;
- ``vision train`` again: the check is answered by the cache (one ``stat`` per file).

The first step's end is the reference's printed line and, for vision, the first ``train`` record in
``metrics.jsonl`` (flushed when the step ends); each process is stopped there.  Both train at 256 px so
the step itself weighs little beside the start-up.  The last line gives vision's times against the
reference's.
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
sys.path.insert(0, str(ROOT))
# As a user runs them: with bytecode caches (this environment may disable writing them).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV.update(NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))

REFERENCE = r'''
import sys, time
t0 = float(sys.argv[3])
import torch, torchvision
from torch.utils.data import DataLoader
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.models.detection import retinanet_resnet50_fpn
from torchvision.transforms import v2 as T

root, ann = sys.argv[1], sys.argv[2]
ds = CocoDetection(root, ann, transforms=T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True)]))
ds = wrap_dataset_for_transforms_v2(ds, target_keys=("boxes", "labels"))
num_classes = max(ds.coco.getCatIds()) + 1
loader = DataLoader(ds, batch_size=2, shuffle=True, num_workers=2, collate_fn=lambda b: tuple(zip(*b)))
model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, min_size=256,
                               max_size=342)
opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
model.train()
images, targets = next(iter(loader))
loss = sum(model(list(images), list(targets)).values())
loss.backward()
opt.step()
print(f"first step {time.time() - t0:.3f}", flush=True)
'''


RECIPE = """\
name: first_step
model: {{arch: retinanet, backbone: resnet50, min_size: [256], max_size: 342}}
data:
  root: {root}
  train: {{ann: train.json, images: images}}
  val: {{ann: val.json, images: val_images}}
  batch_size: 2
  num_workers: 2
train: {{device: cpu, max_iters: 1, log_every: 1, eval_every: 0}}
"""


def make_set(folder: Path, n_images: int, size: tuple[int, int]) -> Path:
    """A COCO set of ``n_images`` distinct files whose pixels and annotations repeat 200 generated ones."""
    from vision.data.synthetic import make_synthetic_dataset

    base = folder / "base"
    make_synthetic_dataset(base, num_train=200, num_val=2, image_size=size, classes=3, image_format="jpg",
                           style="plain", seed=0)
    src = json.loads((base / "train.json").read_text())
    by_image: dict[int, list[dict]] = {}
    for a in src["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    images_dir = folder / "images"
    images_dir.mkdir()
    images, annotations = [], []
    for i in range(n_images):
        im = src["images"][i % len(src["images"])]
        name = f"{i:06d}.jpg"
        shutil.copyfile(base / "images" / im["file_name"], images_dir / name)
        images.append({**im, "id": i + 1, "file_name": name})
        for a in by_image.get(im["id"], []):
            annotations.append({**a, "id": len(annotations) + 1, "image_id": i + 1})
    ann = folder / "train.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": src["categories"]}))
    shutil.copyfile(base / "val.json", folder / "val.json")
    shutil.copytree(base / "images", folder / "val_images")
    return ann


def time_reference(folder: Path, ann: Path) -> float:
    script = folder / "reference.py"
    script.write_text(REFERENCE)
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(script), str(folder / "images"), str(ann), repr(t0)],
                          capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        sys.exit(f"reference failed: {proc.stderr[-2000:]}")
    return float(proc.stdout.split("first step")[1].split()[0])


def time_vision(folder: Path, run: Path) -> float:
    """Launch to the first ``train`` record in metrics.jsonl; the process is stopped there."""
    recipe = folder / "recipe.yaml"
    recipe.write_text(RECIPE.format(root=folder))
    cmd = [sys.executable, "-m", "vision", "train", str(recipe), "--output", str(run)]
    metrics = run / "metrics.jsonl"
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if metrics.is_file() and '"kind": "train"' in metrics.read_text():
                return time.time() - t0
            if proc.poll() is not None:
                sys.exit(f"vision train ended before a step ({proc.returncode}): {proc.stderr.read()[-2000:]}")
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    ap.add_argument("--keep", help="make the set in this folder and keep it")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        t = time.time()
        ann = make_set(folder, args.images, tuple(args.size))
        print(f"{args.images} images of {args.size[0]}x{args.size[1]} written in {time.time() - t:.0f} s")
        ref = time_reference(folder, ann)
        print(f"torchvision CocoDetection + DataLoader: first step after {ref:.1f} s")
        first = time_vision(folder, folder / "run1")
        print(f"vision train, first run (checks {args.images} images, writes the cache): {first:.1f} s")
        second = time_vision(folder, folder / "run2")
        print(f"vision train, second run (cache): {second:.1f} s")
    print(f"time to first step, torchvision / vision: first run {ref / first:.2f}x, cached {ref / second:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
