"""Detection AutoAugment (Zoph et al. 2019, "Learning Data Augmentation Strategies for Object Detection").

A policy is a list of sub-policies; each image gets one sub-policy drawn uniformly, whose operations
(name, probability, magnitude level 0-10) run in order, each with its probability.  The four published
policies are below as released with the paper (TensorFlow object detection, ``autoaugment_utils.py``);
v0 is the one the paper's COCO results use.  A config may instead spell a policy out as a list of
sub-policies, ``[[["Equalize", 0.8, 10], ["TranslateX_BBox", 0.8, 4]], ...]``.

No maintained PyTorch library moves boxes *and* instance masks through these operations; the
operations themselves, and where they depart from the release, are in ``autoaugment_ops``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vision.data.autoaugment_ops import OPERATIONS, AutoAugmentHparams, Sample
from vision.errors import VisionError

SubPolicy = list[tuple[str, float, float]]

POLICY_V0: list[SubPolicy] = [
    [("TranslateX_BBox", 0.6, 4), ("Equalize", 0.8, 10)],
    [("TranslateY_Only_BBoxes", 0.2, 2), ("Cutout", 0.8, 8)],
    [("Sharpness", 0.0, 8), ("ShearX_BBox", 0.4, 0)],
    [("ShearY_BBox", 1.0, 2), ("TranslateY_Only_BBoxes", 0.6, 6)],
    [("Rotate_BBox", 0.6, 10), ("Color", 1.0, 6)],
]

POLICY_V1: list[SubPolicy] = [
    *POLICY_V0,
    [("Color", 0.0, 0), ("ShearX_Only_BBoxes", 0.8, 4)],
    [("ShearY_Only_BBoxes", 0.8, 2), ("Flip_Only_BBoxes", 0.0, 10)],
    [("Equalize", 0.6, 10), ("TranslateX_BBox", 0.2, 2)],
    [("Color", 1.0, 10), ("TranslateY_Only_BBoxes", 0.4, 6)],
    [("Rotate_BBox", 0.8, 10), ("Contrast", 0.0, 10)],
    [("Cutout", 0.2, 2), ("Brightness", 0.8, 10)],
    [("Color", 1.0, 6), ("Equalize", 1.0, 2)],
    [("Cutout_Only_BBoxes", 0.4, 6), ("TranslateY_Only_BBoxes", 0.8, 2)],
    [("Color", 0.2, 8), ("Rotate_BBox", 0.8, 10)],
    [("Sharpness", 0.4, 4), ("TranslateY_Only_BBoxes", 0.0, 4)],
    [("Sharpness", 1.0, 4), ("SolarizeAdd", 0.4, 4)],
    [("Rotate_BBox", 1.0, 8), ("Sharpness", 0.2, 8)],
    [("ShearY_BBox", 0.6, 10), ("Equalize_Only_BBoxes", 0.6, 8)],
    [("ShearX_BBox", 0.2, 6), ("TranslateY_Only_BBoxes", 0.2, 10)],
    [("SolarizeAdd", 0.6, 8), ("Brightness", 0.8, 10)],
]

POLICY_V2: list[SubPolicy] = [
    [("Color", 0.0, 6), ("Cutout", 0.6, 8), ("Sharpness", 0.4, 8)],
    [("Rotate_BBox", 0.4, 8), ("Sharpness", 0.4, 2), ("Rotate_BBox", 0.8, 10)],
    [("TranslateY_BBox", 1.0, 8), ("AutoContrast", 0.8, 2)],
    [("AutoContrast", 0.4, 6), ("ShearX_BBox", 0.8, 8), ("Brightness", 0.0, 10)],
    [("SolarizeAdd", 0.2, 6), ("Contrast", 0.0, 10), ("AutoContrast", 0.6, 0)],
    [("Cutout", 0.2, 0), ("Solarize", 0.8, 8), ("Color", 1.0, 4)],
    [("TranslateY_BBox", 0.0, 4), ("Equalize", 0.6, 8), ("Solarize", 0.0, 10)],
    [("TranslateY_BBox", 0.2, 2), ("ShearY_BBox", 0.8, 8), ("Rotate_BBox", 0.8, 8)],
    [("Cutout", 0.8, 8), ("Brightness", 0.8, 8), ("Cutout", 0.2, 2)],
    [("Color", 0.8, 4), ("TranslateY_BBox", 1.0, 6), ("Rotate_BBox", 0.6, 6)],
    [("Rotate_BBox", 0.6, 10), ("BBox_Cutout", 1.0, 4), ("Cutout", 0.2, 8)],
    [("Rotate_BBox", 0.0, 0), ("Equalize", 0.6, 6), ("ShearY_BBox", 0.6, 8)],
    [("Brightness", 0.8, 8), ("AutoContrast", 0.4, 2), ("Brightness", 0.2, 2)],
    [("TranslateY_BBox", 0.4, 8), ("Solarize", 0.4, 6), ("SolarizeAdd", 0.2, 10)],
    [("Contrast", 1.0, 10), ("SolarizeAdd", 0.2, 8), ("Equalize", 0.2, 4)],
]

POLICY_V3: list[SubPolicy] = [
    [("Posterize", 0.8, 2), ("TranslateX_BBox", 1.0, 8)],
    [("BBox_Cutout", 0.2, 10), ("Sharpness", 1.0, 8)],
    [("Rotate_BBox", 0.6, 8), ("Rotate_BBox", 0.8, 10)],
    [("Equalize", 0.8, 10), ("AutoContrast", 0.2, 10)],
    [("SolarizeAdd", 0.2, 2), ("TranslateY_BBox", 0.2, 8)],
    [("Sharpness", 0.0, 2), ("Color", 0.4, 8)],
    [("Equalize", 1.0, 8), ("TranslateY_BBox", 1.0, 8)],
    [("Posterize", 0.6, 2), ("Rotate_BBox", 0.0, 10)],
    [("AutoContrast", 0.6, 0), ("Rotate_BBox", 1.0, 6)],
    [("Equalize", 0.0, 4), ("Cutout", 0.8, 10)],
    [("Brightness", 1.0, 2), ("TranslateY_BBox", 1.0, 6)],
    [("Contrast", 0.0, 2), ("ShearY_BBox", 0.8, 0)],
    [("AutoContrast", 0.8, 10), ("Contrast", 0.2, 10)],
    [("Rotate_BBox", 1.0, 10), ("Cutout", 1.0, 10)],
    [("SolarizeAdd", 0.8, 6), ("Equalize", 0.8, 8)],
]

POLICIES: dict[str, list[SubPolicy]] = {"v0": POLICY_V0, "v1": POLICY_V1, "v2": POLICY_V2, "v3": POLICY_V3}


def parse_policy(policy: str | Sequence[Any]) -> list[SubPolicy]:
    """A policy name or a list of sub-policies -> checked list of sub-policies."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise VisionError(f"unknown AutoAugment policy '{policy}' (choose {', '.join(POLICIES)} "
                              "or give a list of sub-policies)")
        return [list(sub) for sub in POLICIES[policy]]
    if not isinstance(policy, Sequence) or len(policy) == 0:
        raise VisionError(f"an AutoAugment policy must be a name or a non-empty list of sub-policies, got {policy!r}")
    parsed = []
    for i, sub in enumerate(policy):
        if not isinstance(sub, Sequence) or isinstance(sub, str) or len(sub) == 0:
            raise VisionError(f"AutoAugment sub-policy {i} must be a non-empty list of [name, probability, level]")
        ops = []
        for op in sub:
            if isinstance(op, str) or not isinstance(op, Sequence) or len(op) != 3:
                raise VisionError(f"AutoAugment sub-policy {i}: {op!r} is not [name, probability, level]")
            name, prob, level = op
            if name not in OPERATIONS:
                raise VisionError(f"unknown AutoAugment operation '{name}' in sub-policy {i} "
                                  f"(known: {', '.join(sorted(OPERATIONS))})")
            if not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
                raise VisionError(f"AutoAugment operation '{name}': probability {prob!r} is not in [0, 1]")
            if not isinstance(level, (int, float)) or not 0.0 <= level <= 10.0:
                raise VisionError(f"AutoAugment operation '{name}': level {level!r} is not in [0, 10]")
            ops.append((str(name), float(prob), float(level)))
        parsed.append(ops)
    return parsed


def _check_sample(sample: Sample) -> Sample:
    image = sample.get("image")
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise VisionError("AutoAugment needs an HxWx3 uint8 RGB image")
    out = dict(sample)
    out["boxes"] = np.asarray(sample.get("boxes", np.zeros((0, 4))), np.float32).reshape(-1, 4)
    out["labels"] = np.asarray(sample.get("labels", np.zeros(0)), np.int64).reshape(-1)
    n = len(out["boxes"])
    if len(out["labels"]) != n:
        raise VisionError(f"AutoAugment got {n} boxes but {len(out['labels'])} labels")
    if sample.get("masks") is not None:
        masks = np.asarray(sample["masks"])
        if masks.shape != (n, *image.shape[:2]):
            raise VisionError(f"AutoAugment needs masks of shape {(n, *image.shape[:2])}, got {masks.shape}")
        out["masks"] = masks.astype(np.uint8, copy=False)
    else:
        out.pop("masks", None)
    return out


def apply_operation(
    name: str,
    sample: Sample,
    level: float,
    *,
    prob: float = 1.0,
    rng: np.random.Generator | None = None,
    hparams: AutoAugmentHparams | None = None,
) -> Sample:
    """Runs one named operation at ``level``.

    Operations on the whole image run for certain; ``*_Only_BBoxes`` operations give each box the
    chance ``prob / 3`` as in the policies (so ``prob=3`` changes every box).
    """
    op = OPERATIONS.get(name)
    if op is None:
        raise VisionError(f"unknown AutoAugment operation '{name}' (known: {', '.join(sorted(OPERATIONS))})")
    rng = rng if rng is not None else np.random.default_rng()
    return op.fn(_check_sample(sample), float(level), float(prob), rng, hparams or AutoAugmentHparams())


class DetectionAutoAugment:
    """A detection AutoAugment policy, callable on ``{"image", "boxes", "labels"[, "masks"]}``.

    ``reference_size`` (config ``data.augment.autoaugment_reference_size``) rescales the policies'
    pixel constants, which were set for ~640 px images, to min(H, W) / reference_size.

    Instances that a geometric operation pushes out of the image are dropped from boxes, labels and
    masks together.  With ``seed`` set the draws are reproducible; inside DataLoader workers the
    generator is re-seeded from the worker's torch seed too, so workers and epochs differ (and are
    still reproducible when the run seeds torch).
    """

    def __init__(self, policy: str | Sequence[Any] = "v0", seed: int | None = None,
                 hparams: AutoAugmentHparams | None = None, *, reference_size: int | None = None):
        self.policy = parse_policy(policy)
        self.seed = seed
        hparams = hparams or AutoAugmentHparams()
        if reference_size is not None:
            hparams = dataclasses.replace(hparams, reference_size=reference_size)
        self.hparams = hparams
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[int, int | None] | None = None

    def _generator(self) -> np.random.Generator:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        key = (os.getpid(), None if info is None else int(info.seed))
        if self._rng is None or key != self._rng_key:
            entropy = [] if self.seed is None else [self.seed]
            if info is not None:
                entropy.append(int(info.seed))
            self._rng = np.random.default_rng(entropy or None)
            self._rng_key = key
        return self._rng

    def set_random_seed(self, seed: int) -> None:
        """Reseeds the draws, so that a sample can be drawn under its own seed wherever it is drawn."""
        self._generator()
        self._rng = np.random.default_rng(seed)

    def __call__(self, sample: Sample, rng: np.random.Generator | None = None) -> Sample:
        rng = rng if rng is not None else self._generator()
        out = _check_sample(sample)
        sub = self.policy[int(rng.integers(0, len(self.policy)))]
        for name, prob, level in sub:
            op = OPERATIONS[name]
            if op.in_boxes or rng.random() < prob:
                out = op.fn(out, level, prob, rng, self.hparams)
        return out

    def __repr__(self) -> str:
        return f"DetectionAutoAugment({len(self.policy)} sub-policies, seed={self.seed})"
