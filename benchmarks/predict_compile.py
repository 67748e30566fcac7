"""``vision predict --compile`` against ``vision predict`` over a folder of mixed-size photos, whole processes.

Usage:
    python benchmarks/predict_compile.py [--data ../shared/data/raccoon/images] [--images 64]
        [--arch retinanet] [--keep DIR]

The same weights as ``benchmarks/predict_cli.py`` (torchvision's ``*_resnet50_fpn`` with trained-looking
batch-norm statistics), the first ``--images`` photos of the folder (the raccoon photos come in 47 sizes).
Three fresh processes, in this order:

- ``vision predict`` (eager, the default);
- ``vision predict --compile`` with empty caches (``VISION_COMPILE_CACHE`` and ``TORCHINDUCTOR_CACHE_DIR``
  in the scratch folder): the first run, which exports the backbone and head and compiles them;
- the same command again: the second run, which loads the compiled packages from that cache.

Compiled and eager detections are compared image by image (of eager's top 20 per image, how many the
compiled run reports with the same label and a box within a pixel, and their largest score difference).
The last line gives eager seconds / compiled seconds for the second run (and for the first).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_cli import ROOT, _environment, agreement, copy_photos, save_weights, vision_detections


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:4])} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "raccoon" / "images"))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--arch", default="retinanet", choices=("retinanet", "faster_rcnn", "mask_rcnn"))
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        weights = tmp / f"{args.arch}_r50_fpn.pth"
        save_weights(args.arch, weights)
        folder = tmp / "folder"
        shutil.rmtree(folder, ignore_errors=True)
        copy_photos(Path(args.data), folder, args.images)
        cache = tmp / "inductor-cache"
        shutil.rmtree(cache, ignore_errors=True)
        env = {**_environment(), "TORCHINDUCTOR_CACHE_DIR": str(cache), "VISION_COMPILE_CACHE": str(tmp / "compiled")}
        shutil.rmtree(tmp / "compiled", ignore_errors=True)
        runs = {}
        for label, extra in (("eager", []), ("compiled, first run", ["--compile"]),
                             ("compiled, second run", ["--compile"])):
            out = tmp / label.replace(", ", "_").replace(" ", "_")
            shutil.rmtree(out, ignore_errors=True)
            seconds = timed([sys.executable, "-m", "vision", "predict", "--weights", str(weights), "--config",
                             str(ROOT / "configs" / f"{args.arch}_r50_fpn.yaml"), "--source", str(folder),
                             "--out", str(out), *extra, "model.bn_eps=1e-5", "model.pretrained=null"], env)
            runs[label] = (seconds, out)
            print(f"  {label}: {seconds:.1f} s ({seconds / args.images:.2f} s/image)", flush=True)
        eager = vision_detections(runs["eager"][1])
        for label in ("compiled, first run", "compiled, second run"):
            found, wanted, worst = agreement(vision_detections(runs[label][1]), eager)
            print(f"  {label}: eager's top-20 detections found {found}/{wanted}, largest score difference {worst:.2e}")
    eager_s, first_s, second_s = (runs[k][0] for k in ("eager", "compiled, first run", "compiled, second run"))
    print(f"{args.images} photos: eager {eager_s:.1f} s, compiled first run {first_s:.1f} s, second run "
          f"{second_s:.1f} s")
    print(f"vision predict eager / --compile, whole processes: second run {eager_s / second_s:.2f}x, "
          f"first run {eager_s / first_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
