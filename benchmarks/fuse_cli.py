"""``vision fuse`` end to end against the same job done with ensemble-boxes, both as whole processes.

Writes synthetic COCO results files (``--models`` files, ``--images`` images, ``--boxes`` detections
per image and model, made like ``benchmarks/fusion.py``'s: every model sees the same objects with its
own jitter, score and 10% wrong labels; pixel coordinates at full float precision, as ``vision predict``
writes them), then times, in alternation, ``vision fuse --method wbf`` and a plain script that does
what a user of ensemble-boxes would: ``json.load`` the files, fuse image by image with
``ensemble_boxes.weighted_boxes_fusion``, ``json.dump`` the result.  Both are fresh interpreters, so
their imports count.  The two outputs must hold the same detections (exit status 1 otherwise): the
same images, categories, scores and pixel boxes, bit for bit.

CPU seconds (user + system) of each whole process, best of ``--repeat`` for each side, since on a shared
machine other processes inflate wall time (printed too) far more; the last line is the ratio.

    python benchmarks/fuse_cli.py [--images 600] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# The reference: what a user of ensemble-boxes writes to fuse COCO results files.
ENSEMBLE_BOXES_SCRIPT = r'''
import json, sys
from collections import defaultdict
import numpy as np
from ensemble_boxes import weighted_boxes_fusion

images_path, out_path, *dets_paths = sys.argv[1:]
images = json.load(open(images_path))
sizes = {im["id"]: (im["width"], im["height"]) for im in images["images"]}
per_image = defaultdict(lambda: [[] for _ in dets_paths])
for t, path in enumerate(dets_paths):
    for d in json.load(open(path)):
        per_image[d["image_id"]][t].append(d)
out = []
for image_id, (w, h) in sizes.items():
    if image_id not in per_image:
        continue
    boxes, scores, labels = [], [], []
    for dets in per_image[image_id]:
        boxes.append([[d["bbox"][0] / w, d["bbox"][1] / h, (d["bbox"][0] + d["bbox"][2]) / w,
                       (d["bbox"][1] + d["bbox"][3]) / h] for d in dets])
        scores.append([d["score"] for d in dets])
        labels.append([d["category_id"] for d in dets])
    b, s, l = weighted_boxes_fusion(boxes, scores, labels, iou_thr=0.55, skip_box_thr=0.0)
    for (x1, y1, x2, y2), score, label in zip(b.tolist(), s.tolist(), l.tolist()):
        out.append({"image_id": image_id, "category_id": int(label),
                    "bbox": [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h], "score": score})
with open(out_path, "w") as f:
    json.dump(out, f)
'''


def make_files(folder: Path, n_images: int, n_models: int, n_boxes: int, n_classes: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "width": int(rng.integers(320, 1280)), "height": int(rng.integers(240, 960)),
               "file_name": f"{i + 1}.jpg"} for i in range(n_images)]
    cats = [{"id": c + 1, "name": f"class{c + 1}"} for c in range(n_classes)]
    (folder / "images.json").write_text(json.dumps({"images": images, "categories": cats}))
    per_model: list[list[dict]] = [[] for _ in range(n_models)]
    for im in images:
        w, h = im["width"], im["height"]
        centre = rng.random((n_boxes, 2))
        size = rng.uniform(0.02, 0.4, (n_boxes, 2))
        base = np.concatenate([centre - size / 2, centre + size / 2], axis=1).clip(0, 1)
        labels = rng.integers(0, n_classes, n_boxes) + 1
        for t in range(n_models):
            jitter = rng.normal(0, 0.02, base.shape) * np.tile(size, 2)
            b = (base + jitter).clip(0, 1)
            b = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], axis=1)
            b = b * [w, h, w, h]
            xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
            lab = labels.copy()
            wrong = rng.random(n_boxes) < 0.1
            lab[wrong] = rng.integers(0, n_classes, wrong.sum()) + 1
            scores = rng.random(n_boxes)
            per_model[t] += [{"image_id": im["id"], "category_id": int(c), "bbox": bb, "score": s}
                             for c, bb, s in zip(lab.tolist(), xywh.tolist(), scores.tolist())]
    paths = []
    for t, dets in enumerate(per_model):
        paths.append(folder / f"model{t}.json")
        paths[-1].write_text(json.dumps(dets))
    return paths


# As a user runs them: with bytecode caches (this environment may disable writing them).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of ``cmd``: user + system time of the child, which other
    processes on a shared machine inflate far less than wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])}... failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, wall


def same_detections(ours_path: Path, ref_path: Path) -> tuple[bool, str]:
    def table(path: Path):
        dets = json.loads(path.read_text())
        key = np.array([[d["image_id"], d["category_id"]] for d in dets], dtype=np.int64).reshape(-1, 2)
        score = np.array([d["score"] for d in dets], dtype=np.float64)
        bbox = np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)
        o = np.lexsort((*bbox.T[::-1], score, key[:, 1], key[:, 0]))
        return key[o], score[o], bbox[o]

    (ka, sa, ba), (kb, sb, bb) = table(ours_path), table(ref_path)
    if ka.shape != kb.shape:
        return False, f"{len(ka)} detections against {len(kb)}"
    if not (np.array_equal(ka, kb) and np.array_equal(sa, sb)):
        return False, "image ids, categories or scores differ"
    if not np.array_equal(ba, bb):
        return False, f"boxes differ by up to {np.abs(ba - bb).max():.3g} px"
    return True, f"{len(ka)} detections equal"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--boxes", type=int, default=300)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side; the best counts")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dets = make_files(folder, args.images, args.models, args.boxes, args.classes, args.seed)
        size_mb = sum(p.stat().st_size for p in dets) / 2**20
        ours_out, ref_out = folder / "vision.json", folder / "ensemble_boxes.json"
        script = folder / "fuse_ensemble_boxes.py"
        script.write_text(ENSEMBLE_BOXES_SCRIPT)
        ours_cmd = [sys.executable, "-m", "vision.cli", "fuse", "--method", "wbf", "--images",
                    str(folder / "images.json"), "--out", str(ours_out), "--dets", *map(str, dets)]
        ref_cmd = [sys.executable, str(script), str(folder / "images.json"), str(ref_out), *map(str, dets)]
        env_note = os.environ.get("VISION_NUMBA", "auto")
        timed(ours_cmd)  # warm-up: bytecode caches (and the Numba cache, where used)
        timed([sys.executable, "-c", "import json, numpy, ensemble_boxes"])
        t_ours, t_ref = [], []
        for i in range(args.repeat):
            for which in ("ours", "ref") if i % 2 == 0 else ("ref", "ours"):
                (t_ours if which == "ours" else t_ref).append(timed(ours_cmd if which == "ours" else ref_cmd))
        ok, detail = same_detections(ours_out, ref_out)
    print(f"{args.images} images x {args.models} models x {args.boxes} boxes ({size_mb:.0f} MiB of results),"
          f" WBF, VISION_NUMBA={env_note}; {detail}" if ok else f"OUTPUTS DIFFER: {detail}")
    (a, aw), (b, bw) = min(t_ours), min(t_ref)
    print(f"wall seconds: vision fuse {aw:.2f}, ensemble-boxes script {bw:.2f} ({bw / aw:.1f}x)")
    print(f"vision fuse {a:.2f} s, ensemble-boxes script {b:.2f} s (CPU, best of {args.repeat}): {b / a:.1f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
