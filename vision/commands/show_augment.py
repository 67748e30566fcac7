"""``vision show-augment``: what the training pipeline feeds the model, drawn, so a policy can be judged by eye."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training recipe (its data.train split and data.augment are used)")
    parser.add_argument("--n", type=int, default=16, help="how many augmented samples to draw")
    parser.add_argument("--out", required=True, help="folder for the drawings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. data.augment.autoaugment=v1")


def run(args: argparse.Namespace) -> int:
    import random

    import numpy as np
    import torch

    from vision.config import load_config
    from vision.data.build import build_datasets
    from vision.data.dataset import DetectionDataset
    from vision.data.transforms import build_train_transform
    from vision.inference.draw import draw_prediction, save_drawing

    cfg = load_config(args.config, args.overrides)
    train_set, _ = build_datasets(cfg)
    dataset = DetectionDataset(
        train_set, build_train_transform(cfg.data.augment), cfg.data.with_masks, cfg.data.skip_difficult
    )
    rng = random.Random(args.seed)
    out = Path(args.out)
    for k in range(args.n):
        index = rng.randrange(len(dataset))
        random.seed(args.seed * 100003 + k)
        np.random.seed((args.seed * 100003 + k) % 2**32)
        torch.manual_seed(args.seed * 100003 + k)
        image, target = dataset[index]
        shown = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(len(target["labels"]))}
        if "masks" in target:
            shown["masks"] = target["masks"].float()
        pixels = (image * 255).round().byte().permute(1, 2, 0).numpy()
        name = Path(train_set.records[index].file_name).stem
        save_drawing(draw_prediction(pixels, shown, train_set.categories, score_thresh=0.0), out / f"{k:03d}_{name}.png")
    print(f"drew {args.n} augmented samples of {len(dataset)} training images -> {out}")
    return 0
