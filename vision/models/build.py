"""``build_model(cfg)``: one entry point from a ``ModelConfig`` to a ``torch.nn.Module``.

Each architecture registers a builder in ``BUILDERS`` (arch name -> function of the config), so
adding an architecture is one line here and nothing changes for the callers.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from vision.config import ModelConfig
from vision.errors import ConfigError
from vision.models.classifier import build_classifier
from vision.models.detection import build_faster_rcnn, build_mask_rcnn, build_retinanet
from vision.models.semantic import build_semantic_fpn

BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "retinanet": build_retinanet,
    "faster_rcnn": build_faster_rcnn,
    "mask_rcnn": build_mask_rcnn,
    "semantic_fpn": build_semantic_fpn,
    "classifier": build_classifier,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model the config describes, with random or backbone-pretrained weights."""
    builder = BUILDERS.get(cfg.arch)
    if builder is None:
        raise ConfigError(f"unknown model.arch '{cfg.arch}' (one of: {', '.join(sorted(BUILDERS))})")
    return builder(cfg)
