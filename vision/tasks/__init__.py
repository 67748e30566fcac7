"""One module per task; ``TASKS`` maps each ``model.arch`` to its task, the one place that does.

``task_for(cfg)`` gives the config's ``Task`` (``base.py``): its data sets, its metric, its predictions'
form and its writer.  Task modules are imported on use, so naming a task costs nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from vision.config import Config
from vision.errors import ConfigError

if TYPE_CHECKING:
    from vision.tasks.base import Task

# model.arch -> "module:class" of its task
TASKS: dict[str, str] = {
    "retinanet": "vision.tasks.detection:DetectionTask",
    "faster_rcnn": "vision.tasks.detection:DetectionTask",
    "mask_rcnn": "vision.tasks.detection:DetectionTask",
    "semantic_fpn": "vision.tasks.semantic:SemanticTask",
    "classifier": "vision.tasks.classification:ClassificationTask",
}


def task_class(arch: str) -> type[Task]:
    spec = TASKS.get(arch)
    if spec is None:
        raise ConfigError(f"model.arch={arch}: expected one of {', '.join(TASKS)}")
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def task_for(cfg: Config) -> Task:
    """The task of ``cfg.model.arch``."""
    return task_class(cfg.model.arch)(cfg)
