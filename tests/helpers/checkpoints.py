"""Tiny checkpoints, as training writes them, for the tests that predict, export or load.

The models are untrained ``test_resnet`` networks at 64 px: built in milliseconds, yet they run the
whole inference path.  An untrained RetinaNet head scores every anchor the same, and tied scores
order at random, so ``spread_scores`` gives its logits some spread: comparisons of two code paths
then see one well-defined order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from vision.config import config_to_dict, load_config
from vision.engine.checkpoint import atomic_save
from vision.models import build_model

# What each task needs beyond the shared tiny settings: detectors keep every box, classifiers take 64 px.
ARCH_OVERRIDES = {
    "retinanet": ["model.score_thresh=0.0", "model.detections_per_img=5"],
    "faster_rcnn": ["model.score_thresh=0.0", "model.detections_per_img=5"],
    "mask_rcnn": ["model.score_thresh=0.0", "model.detections_per_img=5"],
    "semantic_fpn": [],
    "classifier": ["model.image_size=64"],
}


def write_checkpoint(
    path: Path,
    arch: str = "retinanet",
    *,
    seed: int = 0,
    names: Sequence[str] = ("a", "b"),
    ids: Sequence[int] | None = None,
    overrides: Sequence[str] = (),
    spread_scores: bool = False,
    with_categories: bool = True,
) -> Path:
    """Writes an inference checkpoint (weights, resolved config, categories) and returns its path.

    ``ids`` are the data set's category ids (1..K when not given); ``with_categories=False`` writes a
    checkpoint as older versions did, with class names only.  ``overrides`` come after the task's own.
    """
    torch.manual_seed(seed)
    cfg = load_config(None, [f"model.arch={arch}", "model.backbone=test_resnet", f"model.num_classes={len(names)}",
                             "model.fpn_channels=16", "model.min_size=[64]", "model.max_size=64",
                             *ARCH_OVERRIDES[arch], *overrides])
    model = build_model(cfg.model)
    if spread_scores:
        with torch.no_grad():
            torch.nn.init.normal_(model.head.classification_head.cls_logits.weight, std=0.3)
    state = {"model": model.state_dict(), "config": config_to_dict(cfg), "arch": arch, "class_names": list(names)}
    if with_categories:
        state["categories"] = {"ids": list(ids) if ids is not None else list(range(1, len(names) + 1)),
                               "names": list(names)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state, path)
    return path
