"""DataLoaders whose workers share the cores with the model instead of fighting it for them."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vision.runtime.device import use_pinned_memory


def seed_worker(worker_id: int) -> None:
    """DataLoader workers: seeded from the loader's generator, one thread each (no oversubscription:
    the workers share the cores with the model, and OpenCV would otherwise start a pool per worker).

    OpenCV gets 0 threads (run in the calling thread), not 1: resizing a thread pool that the parent
    had started before the fork waits forever for threads that do not exist in the child."""
    import cv2

    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
    torch.set_num_threads(1)
    cv2.setNumThreads(0)


def make_loader(
    dataset: Dataset,
    batch_sampler: Any,
    num_workers: int,
    device: torch.device,
    seed: int,
    collate_fn: Callable,
    persistent: bool = True,
) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=use_pinned_memory(device),
        persistent_workers=persistent and num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        worker_init_fn=seed_worker,
        generator=generator,
    )
