"""Mask pasting: the engine's ``paste_masks`` against torchvision's ``paste_masks_in_image``.

Usage:
    python benchmarks/paste_masks.py [--data ../shared/data/nuclei] [--image 0] [--rounds 3]

The boxes are a real crowded image's: the ground-truth boxes of the nuclei validation image with the
most instances (its own size; ``--image k`` takes the k-th most crowded instead), each given a random
28x28 mask probability map as Mask R-CNN's mask head does.  Without the data set, 375 boxes of nuclei
sizes on a 1388x1040 image.  Both functions paste the same masks; the outputs are checked equal before
anything is timed.  Prints the best of ``--rounds`` seconds for each; the last line is the ratio,
torchvision / vision (above 1: the engine is faster).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def crowded_boxes(data: Path, rank: int) -> tuple[torch.Tensor, tuple[int, int], str]:
    """xyxy boxes and (height, width) of the validation image with the rank-th most annotations."""
    coco = json.loads((data / "val.json").read_text())
    per_image: dict[int, list[list[float]]] = {}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        per_image.setdefault(ann["image_id"], []).append([x, y, x + w, y + h])
    image_id = sorted(per_image, key=lambda i: -len(per_image[i]))[rank]
    info = next(im for im in coco["images"] if im["id"] == image_id)
    return torch.tensor(per_image[image_id]), (info["height"], info["width"]), info["file_name"]


def synthetic_boxes(n: int = 375, size: tuple[int, int] = (1040, 1388)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    h, w = size
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 40.0, h - 40.0])
    return torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=g) * 30], dim=1)


def best_of(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from vision.inference.postprocess import paste_masks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "nuclei"))
    parser.add_argument("--image", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    if (Path(args.data) / "val.json").is_file():
        boxes, size, name = crowded_boxes(Path(args.data), args.image)
    else:
        size, name = (1040, 1388), "synthetic"
        boxes = synthetic_boxes(size=size)
    g = torch.Generator().manual_seed(1)
    masks = torch.sigmoid(torch.randn(len(boxes), 1, 28, 28, generator=g) * 2)
    print(f"{name}: {len(boxes)} boxes on {size[1]}x{size[0]}, {torch.get_num_threads()} threads")

    ref = paste_masks_in_image(masks, boxes, size)
    got = paste_masks(masks, boxes, size)
    assert torch.equal(got, ref), "the pastes differ"
    del ref, got
    t_ref = best_of(lambda: paste_masks_in_image(masks, boxes, size), args.rounds)
    t_ours = best_of(lambda: paste_masks(masks, boxes, size), args.rounds)
    print(f"torchvision paste_masks_in_image: {t_ref:.4f} s")
    print(f"vision paste_masks:               {t_ours:.4f} s")
    print(f"ratio torchvision / vision: {t_ref / t_ours:.2f}")


if __name__ == "__main__":
    main()
