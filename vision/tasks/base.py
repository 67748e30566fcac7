"""The Task protocol: what one kind of model (detection, semantic segmentation, classification) owns.

Every model here follows torchvision's detection convention: ``model(inputs, targets)`` returns a dict
of losses in training mode and ``model(inputs)`` predictions in eval mode, so the training loop and the
folder runner are the same for all.  What differs is what a task's ``Task`` holds: how its data sets are
read and batched, how its predictions over a validation set are gathered and scored (and which number
picks ``best.pt``), how a prediction becomes a ``Result`` and what its folder run writes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from vision.config import Config
from vision.data.records import Categories
from vision.errors import ConfigError
from vision.inference.result import Result
from vision.inference.runner import Writer

# Options of ``vision predict`` that only detectors use (TTA, fusion, hierarchies), with the value that
# means "not given"; other tasks refuse them rather than silently ignore them.
DETECTION_ONLY_OPTIONS: dict[str, Any] = {
    "tta": False, "tta_scales": [0.8, 1.0, 1.2], "fusion": "wbf", "model_weights": None, "iou": None,
    "skip_score": 0.0, "hierarchy": None, "hierarchy_merge": "nms", "draw_thresh": None,
}


@dataclass
class TrainingData:
    """The read data sets of a training run (``.categories``, ``.labels_per_image()``, ``.source``) and
    the torch data sets over them."""

    train_set: Any
    train_dataset: Dataset
    val_set: Any
    val_dataset: Dataset | None


@dataclass
class WriterOptions:
    """What ``vision predict`` asked the writer for."""

    save_images: bool = False
    draw_thresh: float | None = None  # None: the drawing's default (``draw.DRAW_THRESH``)
    write_csv: bool = False
    expand: Any = None  # detection: per-image parent-class expansion
    categories_out: list[dict[str, Any]] | None = None  # detection: the categories written with it


class Task(ABC):
    """One task, for one config."""

    name: ClassVar[str]  # "detection", ...
    metric: ClassVar[str]  # the metric that picks best.pt, as logs name it
    whole_batches: ClassVar[bool] = False  # the model takes a whole batch of equal-size inputs per pass
    # options of ``vision predict`` this task would ignore, with the value that means "not given"
    refused_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @staticmethod
    def check_classes(categories: Categories | None, val_set: Any) -> None:
        """A validation set must have the classes the model was trained on, in the same order."""
        if categories is not None and list(val_set.categories.names) != list(categories.names):
            raise ConfigError(
                f"the model was trained on classes {list(categories.names)}, the validation set "
                f"({val_set.source}) has {list(val_set.categories.names)}"
            )

    def fill_num_classes(self, categories: Categories, exact: bool = False) -> None:
        """``model.num_classes`` from the training data when 0; a config that has fewer (or, ``exact``,
        other) classes than the data is an error."""
        n, set_to = len(categories), self.cfg.model.num_classes
        if set_to == 0:
            self.cfg.model.num_classes = n
        elif set_to < n or (exact and set_to != n):
            raise ConfigError(f"model.num_classes={set_to} but the training set has {n} classes")

    # training and evaluation -------------------------------------------------------------------------

    @abstractmethod
    def training_data(self) -> TrainingData:
        """Reads the training and validation splits; fills ``model.num_classes`` from the data when 0."""

    @abstractmethod
    def validation_data(self, categories: Categories | None) -> tuple[Any, Dataset]:
        """The validation split alone (the training split when there is none), with ``categories``'
        class names where a checkpoint gives them."""

    @abstractmethod
    def collate(self, batch: list) -> Any:
        """Batches samples for the model."""

    @abstractmethod
    def predict_dataset(self, model: nn.Module, dataset: Dataset, data_set: Any, device: torch.device,
                        **kwargs: Any) -> dict[Any, Any]:
        """This process's share of ``dataset`` predicted, gathered from every process, keyed by sample."""

    @abstractmethod
    def evaluate(self, data_set: Any, predictions: dict[Any, Any]) -> dict[str, Any]:
        """Nested metrics of the predictions."""

    @abstractmethod
    def score(self, metrics: dict[str, Any] | None) -> float:
        """The one number ``best.pt`` follows (higher is better)."""

    def headline(self, metrics: dict[str, Any]) -> str:
        """The metrics on one line, for summaries."""
        from vision.metrics.summary import flat_metrics

        return "  ".join(f"{k} {v:.4f}" for k, v in list(flat_metrics(metrics).items())[:6])

    def report_plots(self, metrics: dict[str, Any], data_set: Any, predictions: dict[Any, Any], out_dir: Path,
                     coco_evals: dict[str, Any]) -> list[Path]:
        """The evaluation's pictures (PR curves, confusion matrix, per-class IoU) beside its metrics."""
        from vision.metrics.eval_plots import write_eval_plots

        return write_eval_plots(metrics, data_set, predictions, out_dir, coco_evals)

    # inference ---------------------------------------------------------------------------------------

    def preprocess(self) -> Callable[[np.ndarray], torch.Tensor] | None:
        """What a decoded HxWx3 RGB image goes through before the model (None: the model resizes itself)."""
        return None

    @abstractmethod
    def writer(self, out_dir: Path, categories: Categories, options: WriterOptions) -> Writer:
        """The writer of a folder run's outputs."""

    @abstractmethod
    def result(self, pred: dict[str, torch.Tensor], categories: Categories, path: str | None,
               shape: tuple[int, int], image: np.ndarray | None) -> Result:
        """One prediction as the Python API returns it."""
