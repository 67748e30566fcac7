"""The tiny RetinaNet recipe the end-to-end tests train on the synthetic shapes (64 px, CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_tiny_recipe(path: Path, name: str, data_root: Path, epochs: int = 1) -> Path:
    """Writes the recipe, reading ``train.json`` / ``val.json`` and ``images/`` under ``data_root``."""
    recipe = {
        "name": name,
        "model": {
            "arch": "retinanet", "backbone": "test_resnet", "fpn_channels": 16, "min_size": [64], "max_size": 64,
            "anchor_sizes": [[8], [16], [32], [48], [64]], "aspect_ratios": [1.0], "score_thresh": 0.0,
        },
        "data": {
            "root": str(data_root), "train": {"ann": "train.json", "images": "images"},
            "val": {"ann": "val.json", "images": "images"}, "batch_size": 2, "num_workers": 0,
        },
        "train": {"device": "cpu", "epochs": epochs, "lr": 0.01, "warmup_iters": 1, "log_every": 1},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path
