"""Which images an epoch visits, and in what order: uniform, class-balanced and repeat-factor sampling.

Long-tailed detection data (a few classes in most images, many classes in a handful) trains poorly
when every image is seen once per epoch.  Two remedies are offered next to plain shuffling:

- ``class_balanced`` (the Open Images 2019 solutions): every draw picks a class uniformly, then an
  image containing it uniformly, so each class is the *reason* for the same share of draws.  Images
  without instances are never drawn, since no class can pick them.  ``class_cap`` keeps at most that
  many distinct images per class (a fixed, seed-chosen subset), so a frequent class does not spread its
  share over thousands of near-duplicates; ``epoch_length`` sets the draws per epoch (default: the
  number of images).  ``class_power`` p softens the balance: a class is picked with probability
  proportional to n(c)^p, n(c) the number of images holding it; p = 0 (default) is the uniform class
  draw above, p = 1 follows the classes' image counts (about what uniform image sampling gives when
  each image holds one class), and p = 0.5 is square-root sampling (Mahajan et al. 2018), which lifts
  rare classes without starving the frequent ones on a short schedule.
- ``repeat_factor`` (LVIS, Gupta et al. 2019): with f(c) the fraction of images containing class c,
  r(c) = max(1, sqrt(t / f(c))); an image repeats r(i) = max of r(c) over its classes (1 without
  labels), rounded stochastically each epoch (floor plus a coin with the fractional part).

Every sampler is built for distributed training.  An epoch's order is a pure function of
``(seed, epoch)``, identical on every rank; it is padded (by repeating its head, as torch's
``DistributedSampler`` does) to a multiple of the number of ranks and rank r takes positions
r, r + R, r + 2R, ...  So ranks get disjoint shares of equal length (DDP needs the same number of
steps everywhere), and ``set_epoch(epoch, start)`` restarts an epoch at this rank's ``start``-th draw,
which is how a resumed run continues mid-epoch exactly where it stopped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from vision.errors import ConfigError, VisionError

SAMPLERS = ("uniform", "class_balanced", "repeat_factor")


class EpochSampler(Sampler[int]):
    """Shared machinery: a per-epoch order, padded and sharded across ranks, resumable mid-epoch."""

    def __init__(self, num_images: int, *, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise VisionError(f"sampler: rank {rank} is not in [0, {num_replicas})")
        self.num_images = num_images
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self._shard: np.ndarray | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's draws (image indices) before padding and sharding: the same on every rank."""
        raise NotImplementedError

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's draws for ``epoch``, padded so that every rank has the same number."""
        order = self.epoch_order(epoch)
        total = math.ceil(len(order) / self.num_replicas) * self.num_replicas
        if total > len(order):
            reps = math.ceil(total / len(order))
            order = np.concatenate([order, np.tile(order, reps)[: total - len(order)]])
        return order[self.rank : total : self.num_replicas]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch's order; iteration begins at this rank's ``start``-th draw of it."""
        if start < 0:
            raise VisionError(f"sampler: start {start} must be >= 0")
        self.epoch = int(epoch)
        self.start = int(start)
        self._shard = self.shard(self.epoch)

    def _current(self) -> np.ndarray:
        if self._shard is None:
            self._shard = self.shard(self.epoch)
        return self._shard

    def __iter__(self) -> Iterator[int]:
        return iter(self._current()[self.start :].tolist())

    def __len__(self) -> int:
        """This rank's draws per epoch (a resumed epoch yields ``len - start`` of them)."""
        return len(self._current())


class UniformSampler(EpochSampler):
    """Each image once per epoch: the same permutation as ``torch.utils.data.DistributedSampler``."""

    def __init__(self, num_images: int, *, shuffle: bool = True, **kwargs: int):
        super().__init__(num_images, **kwargs)
        self.shuffle = shuffle

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_images)
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_images, generator=g).numpy()


def _classes_to_images(labels_per_image: Sequence[np.ndarray]) -> dict[int, np.ndarray]:
    """Class label -> indices of the images holding at least one instance of it."""
    pairs = [(int(c), i) for i, labels in enumerate(labels_per_image) for c in np.unique(labels)]
    out: dict[int, list[int]] = {}
    for c, i in pairs:
        out.setdefault(c, []).append(i)
    return {c: np.asarray(v, np.int64) for c, v in sorted(out.items())}


class ClassBalancedSampler(EpochSampler):
    """Draws a class uniformly, then an image holding it uniformly, ``epoch_length`` times per epoch.

    ``class_images`` (class -> its candidate images, after the cap) is kept for inspection.
    """

    def __init__(self, labels_per_image: Sequence[np.ndarray], *, epoch_length: int | None = None,
                 class_cap: int | None = None, class_power: float = 0.0, **kwargs: int):
        super().__init__(len(labels_per_image), **kwargs)
        if not 0.0 <= class_power <= 1.0:
            raise ConfigError(f"data.class_power must be in [0, 1], got {class_power}")
        self.class_images = _classes_to_images(labels_per_image)
        if not self.class_images:
            raise VisionError("class-balanced sampling needs at least one image with instances")
        if class_cap is not None:
            if class_cap < 1:
                raise ConfigError(f"data.class_cap must be >= 1, got {class_cap}")
            for c, images in self.class_images.items():
                if len(images) > class_cap:
                    keep = np.random.default_rng([self.seed, c, 0x43415020]).choice(
                        len(images), class_cap, replace=False)
                    self.class_images[c] = np.sort(images[keep])
        self.epoch_length = len(labels_per_image) if epoch_length is None else int(epoch_length)
        if self.epoch_length < 1:
            raise ConfigError(f"data.epoch_length must be >= 1, got {epoch_length}")
        sizes = np.array([len(v) for v in self.class_images.values()])
        self._offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._sizes = sizes
        self._flat = np.concatenate(list(self.class_images.values()))
        # Class probabilities from the image counts before the cap: the cap limits distinct images,
        # not how often a class is the reason for a draw.
        counts = np.array([len(v) for v in _classes_to_images(labels_per_image).values()], np.float64)
        weights = counts**class_power
        self.class_probs = weights / weights.sum()
        self._cdf = np.cumsum(self.class_probs) if class_power > 0 else None

    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = self._rng(epoch)
        if self._cdf is None:
            cls = rng.integers(0, len(self._sizes), self.epoch_length)
        else:
            cls = np.searchsorted(self._cdf, rng.random(self.epoch_length) * self._cdf[-1], side="right")
            cls = np.minimum(cls, len(self._sizes) - 1)
        pos = (rng.random(self.epoch_length) * self._sizes[cls]).astype(np.int64)
        return self._flat[self._offsets[cls] + pos]


def repeat_factors(labels_per_image: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """LVIS repeat factors: r(i) = max over the classes c of image i of max(1, sqrt(t / f(c)))."""
    n = len(labels_per_image)
    class_images = _classes_to_images(labels_per_image)
    class_factor = {c: max(1.0, math.sqrt(threshold / (len(images) / n))) for c, images in class_images.items()}
    return np.array([max((class_factor[int(c)] for c in np.unique(labels)), default=1.0)
                     for labels in labels_per_image], np.float64)


class RepeatFactorSampler(EpochSampler):
    """Each image ``floor(r) + Bernoulli(frac(r))`` times per epoch, shuffled (``repeat_factors`` exposed)."""

    def __init__(self, labels_per_image: Sequence[np.ndarray], *, repeat_threshold: float = 0.001,
                 shuffle: bool = True, **kwargs: int):
        super().__init__(len(labels_per_image), **kwargs)
        if repeat_threshold < 0:
            raise ConfigError(f"data.repeat_threshold must be >= 0, got {repeat_threshold}")
        self.repeat_factors = repeat_factors(labels_per_image, repeat_threshold)
        self.shuffle = shuffle

    def repeats(self, epoch: int) -> np.ndarray:
        """How many times each image is drawn in ``epoch`` (stochastic rounding seeded by (seed, epoch))."""
        rng = self._rng(epoch)
        whole = np.floor(self.repeat_factors)
        extra = rng.random(len(whole)) < (self.repeat_factors - whole)
        return (whole + extra).astype(np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        order = np.repeat(np.arange(self.num_images), self.repeats(epoch))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(order)
        return order


def build_sampler(
    kind: str,
    labels_per_image: list[np.ndarray],
    *,
    num_replicas: int = 1,
    rank: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    epoch_length: int | None = None,
    class_cap: int | None = None,
    class_power: float = 0.0,
    repeat_threshold: float = 0.001,
) -> EpochSampler:
    """The sampler named by ``data.sampler`` for a data set's per-image labels.

    ``shuffle=False`` keeps the file order for ``uniform`` and the image order for ``repeat_factor``;
    class-balanced draws are random by nature and ignore it.
    """
    if len(labels_per_image) == 0:
        raise VisionError("cannot sample from a data set with no images")
    common = {"num_replicas": num_replicas, "rank": rank, "seed": seed}
    if kind == "uniform":
        return UniformSampler(len(labels_per_image), shuffle=shuffle, **common)
    if kind == "class_balanced":
        return ClassBalancedSampler(labels_per_image, epoch_length=epoch_length, class_cap=class_cap,
                                    class_power=class_power, **common)
    if kind == "repeat_factor":
        return RepeatFactorSampler(labels_per_image, repeat_threshold=repeat_threshold, shuffle=shuffle, **common)
    raise ConfigError(f"unknown data.sampler '{kind}' (choose {', '.join(SAMPLERS)})")
