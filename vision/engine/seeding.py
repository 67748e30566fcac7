"""Seeds: every sample is drawn under a seed of its own, so a run repeats and resumes bit for bit.

The sampler's order is a pure function of ``(seed, epoch)`` and restarts at any draw; each sample is
drawn with generators seeded from ``(seed, epoch, rank, position in the epoch)``, so augmentation
depends neither on the number of workers nor on where a run was resumed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vision.config import Config
from vision.runtime import distributed as du
from vision.runtime.device import select_device, set_deterministic
from vision.runtime.host_memory import retain_freed_memory


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """A 32-bit seed for one draw, independent of worker count and of where the run was resumed."""
    return int(np.random.SeedSequence([seed, epoch, rank, position]).generate_state(1)[0])


def seed_transform(transform: Any, seed: int) -> None:
    """Reseeds a transform that keeps its own generators instead of the global ones.

    An albumentations pipeline gets one fresh generator pair shared by all its steps
    (``set_random_state``); its ``set_random_seed`` would give every step the same seed and make
    their draws identical (a horizontal and a vertical flip of equal probability would always
    happen together).  Other transforms may offer ``set_random_seed(seed)``.
    """
    if transform is None:
        return
    if callable(getattr(transform, "set_random_state", None)):  # an albumentations pipeline itself
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return
    if callable(getattr(transform, "set_random_seed", None)):
        transform.set_random_seed(seed)
        return
    pipeline = getattr(transform, "pipeline", None)  # DetectionTransform: AutoAugment, then albumentations
    if callable(getattr(pipeline, "set_random_state", None)):
        pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
    autoaugment = getattr(transform, "autoaugment", None)
    if callable(getattr(autoaugment, "set_random_seed", None)):
        autoaugment.set_random_seed(seed ^ 0x5A5A5A5A)


class SeededSamples(Dataset):
    """Wraps a dataset so that item ``(epoch, position, index)`` is drawn under its own seed.

    Python's, NumPy's and torch's global generators are seeded for the draw and restored afterwards,
    so a draw in the main process (``num_workers=0``) leaves the training loop's generators alone.
    """

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0):
        self.dataset = dataset
        self.seed = seed
        self.rank = rank

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        epoch, position, index = key
        s = sample_seed(self.seed, epoch, self.rank, position)
        seed_transform(getattr(self.dataset, "transform", None), s)
        py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(s)
        np.random.seed(s)
        torch.default_generator.manual_seed(s)
        try:
            return self.dataset[index]
        finally:
            random.setstate(py)
            np.random.set_state(npy)
            torch.set_rng_state(th)


class PositionedSampler(Sampler):
    """Yields ``(epoch, position, index)`` from an epoch sampler, starting at ``start``."""

    def __init__(self, sampler: Any):
        self.sampler = sampler
        self.epoch = 0
        self.start = 0
        sampler.set_epoch(0, 0)
        self.epoch_len = len(sampler)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.sampler.set_epoch(epoch, start)
        self.epoch_len = len(self.sampler) if hasattr(self.sampler, "__len__") else self.epoch_len

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for i, index in enumerate(self.sampler):
            yield (self.epoch, self.start + i, int(index))

    def __len__(self) -> int:
        return max(0, self.epoch_len - self.start)


def setup_runtime(cfg: Config) -> tuple[torch.device, du.DistInfo]:
    """Device, process group (under ``torchrun``), determinism and seeds; call before building the model.

    Every rank seeds the same way, so models built right after start identical (DDP also broadcasts
    rank 0's weights); the trainer then reseeds each rank differently, and samples carry their own seeds.
    """
    device = select_device(cfg.train.device)
    retain_freed_memory()  # before the first batch: activations are then reused, not faulted in again
    info = du.init_distributed(device)
    set_deterministic(cfg.train.deterministic)
    seed_everything(cfg.train.seed)
    return device, info


# The trainer ------------------------------------------------------------------------------------------
