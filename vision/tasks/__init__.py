"""What the trainer needs to know about a kind of model, beyond "in training mode, forward returns losses".

Every model the trainer sees follows torchvision's detection convention: ``model(inputs, targets)``
returns a dict of losses in training mode and ``model(inputs)`` returns predictions in eval mode.
What differs between detection, classification and segmentation is how data sets are read and
batched, how predictions are gathered and scored, and which number ``best.pt`` follows.  A ``Task``
holds exactly those parts; ``TASKS`` maps each ``model.arch`` to the function that builds them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from vision.config import Config


@dataclass
class Task:
    """The data and the scoring of one training run.

    ``train_set`` / ``val_set`` are the read data sets (``.categories``, ``.labels_per_image()``,
    ``.source``); ``predict(model, dataset, data_set, device, batch_size=, num_workers=, amp=)`` returns
    predictions keyed by sample id; ``evaluate(data_set, predictions)`` returns nested metrics; ``score``
    picks the number ``best.pt`` follows (higher is better) and ``score_name`` names it in logs.
    """

    train_set: Any
    train_dataset: Dataset
    val_set: Any
    val_dataset: Dataset | None
    collate: Callable
    predict: Callable[..., dict[Any, Any]]
    evaluate: Callable[[Any, dict[Any, Any]], dict[str, Any]]
    score: Callable[[dict[str, Any] | None], float]
    score_name: str = "box AP"


TaskBuilder = Callable[[Config], Task]


def _detection(cfg: Config) -> Task:
    from vision.tasks.detection import build_detection_task

    return build_detection_task(cfg)


def _semantic(cfg: Config) -> Task:
    from vision.tasks.semantic import build_semantic_task

    return build_semantic_task(cfg)


def _classification(cfg: Config) -> Task:
    from vision.tasks.classification import build_classification_task

    return build_classification_task(cfg)


TASKS: dict[str, TaskBuilder] = {
    "retinanet": _detection,
    "faster_rcnn": _detection,
    "mask_rcnn": _detection,
    "semantic_fpn": _semantic,
    "classifier": _classification,
}


def build_task(cfg: Config) -> Task:
    """The task of ``cfg.model.arch`` (fills ``model.num_classes`` from the data when it is 0)."""
    from vision.errors import ConfigError

    builder = TASKS.get(cfg.model.arch)
    if builder is None:
        raise ConfigError(f"model.arch={cfg.model.arch}: expected one of {', '.join(TASKS)}")
    return builder(cfg)
