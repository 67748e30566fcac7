"""A model over a data set's validation split, each process its share: what every task's evaluation runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from vision.data.loader import make_loader
from vision.inference.engine import EngineOptions, optimize_for_inference
from vision.runtime import distributed as du
from vision.runtime.device import autocast, to_device
from vision.runtime.logging import progress
from vision.runtime.precision import precision_context


@torch.inference_mode()
def predict_shards(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    collate: Callable,
    keep: Callable[[list, list, list, list[int]], dict[Any, Any]],
    *,
    batch_size: int = 2,
    num_workers: int = 0,
    amp: bool = False,
    show_progress: bool = True,
    engine: EngineOptions | None = None,
    split_batches: bool = False,
) -> dict[Any, Any]:
    """Runs the model over this rank's share of ``dataset``; what ``keep`` makes of each batch is
    gathered from all ranks onto each.

    ``keep(images, targets, outputs, indices)`` turns one batch (inputs on the device, the model's
    outputs, the dataset indices) into entries of the result; every task's evaluation shares the rest.
    The model runs through the inference engine (``engine``, by default folded batch norms and
    channels_last on a copy, as ``vision predict`` runs it), so evaluation during training measures
    and costs what prediction will; ``EngineOptions.plain()`` evaluates the model as it is.
    ``split_batches`` (detectors, which return one result per image) runs a batch in passes of the
    engine's images per pass: one on a CPU, where padding a batch to its largest image costs more
    than it saves.
    """
    info = du.dist_info()
    indices = list(range(info.rank, len(dataset), info.world_size))  # type: ignore[arg-type]
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    loader = make_loader(dataset, batches, num_workers, device, 0, collate, persistent=False)
    engine = EngineOptions() if engine is None else engine
    was_training = model.training
    model.eval()
    run = optimize_for_inference(model, engine) if engine != EngineOptions.plain() else model
    per_pass = engine.images_per_pass(device) if split_batches else batch_size
    kept: dict[Any, Any] = {}
    bar = progress(len(batches), 0, "eval", show_progress and info.is_main)
    try:
        for batch_indices, (images, targets) in zip(batches, loader):
            images, _ = to_device(images, None, device)
            with autocast(device, amp), precision_context(engine.precision, device):
                if len(images) > per_pass:
                    outputs = [o for i in range(0, len(images), per_pass) for o in run(images[i : i + per_pass])]
                else:
                    outputs = run(images)
            kept.update(keep(images, targets, outputs, batch_indices))
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    if info.enabled:
        merged: dict[Any, Any] = {}
        for part in du.all_gather_object(kept):
            merged.update(part)
        kept = merged
    return kept
