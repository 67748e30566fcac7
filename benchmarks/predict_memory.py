"""Folder inference keeps memory flat: peak memory over 2,000 images against that over 200.

Usage:
    python benchmarks/predict_memory.py [--small 200] [--large 2000] [--size 96] [--workers 2]

Small generated JPEGs and a tiny RetinaNet (timm's ``test_resnet``, 20 detections per image, so results
flow through the partial log and the writers too) so the run takes minutes.  Each
folder is predicted by ``vision predict`` in a fresh process; this script samples, every 50 ms, the
resident memory (RSS from /proc) of that process plus its decoding workers and keeps the peak of the
sum.  Prints both peaks; the last line is their ratio (acceptance: at most 1.10).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_checkpoint(path: Path) -> None:
    import torch

    from vision.config import Config, ModelConfig, config_to_dict
    from vision.models import build_model

    torch.manual_seed(0)
    cfg = Config()
    cfg.model = ModelConfig(arch="retinanet", backbone="test_resnet", num_classes=3, fpn_channels=16,
                            min_size=[96], max_size=128, score_thresh=0.0, detections_per_img=20)
    model = build_model(cfg.model)
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "class_names": ["a", "b", "c"],
                "arch": "retinanet"}, path)


def make_images(folder: Path, n: int, size: int) -> None:
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 255, (size, size + 16, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), img)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kib(pid: int) -> int:
    """RSS of a process and all its descendants (the DataLoader workers)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += _rss_kib(p)
        stack += _children(p)
    return total


def peak_memory(weights: Path, folder: Path, out: Path, workers: int) -> tuple[float, float]:
    """(peak MiB, seconds) of one ``vision predict`` run over ``folder``."""
    cmd = [sys.executable, "-m", "vision.cli", "predict", "--weights", str(weights), "--source", str(folder),
           "--out", str(out), "--workers", str(workers), "--batch-size", "4", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_kib(proc.pid))
        time.sleep(0.05)
    summary = proc.stdout.read().strip().splitlines()
    if proc.returncode != 0:
        raise SystemExit(f"vision predict failed ({proc.returncode}): {summary[-1:] }")
    print(f"  {summary[-1]}", flush=True)
    return peak / 1024, time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=200)
    ap.add_argument("--large", type=int, default=2000)
    ap.add_argument("--size", type=int, default=96, help="image height in pixels")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_checkpoint(tmp / "model.pt")
        peaks = {}
        for n in (args.small, args.large):
            make_images(tmp / f"images{n}", n, args.size)
            peak, secs = peak_memory(tmp / "model.pt", tmp / f"images{n}", tmp / f"out{n}", args.workers)
            peaks[n] = peak
            print(f"{n} images: peak memory {peak:.1f} MiB (process + workers), {secs:.0f} s ({n / secs:.1f} img/s)",
                  flush=True)
    ratio = peaks[args.large] / peaks[args.small]
    print(f"peak memory {args.large} / {args.small} images: {ratio:.3f} ({'within' if ratio <= 1.10 else 'OVER'} 1.10)")
    return 0 if ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
