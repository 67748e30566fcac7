"""Range checks of config values, run when a config is read.

Types are checked where the YAML is turned into dataclasses (``vision.config``); this module checks
what the types cannot say: a learning rate of 0 or NaN, a batch of 0 images, ``min_size: [0]``, a
probability of 1.5.  Each of these would otherwise start a run that fails much later (a division by
zero in a worker, a NaN loss after warm-up) or silently does something else (``epochs: 0`` trained one
epoch).  The message names the dotted key, as for unknown keys.  ``model.kwargs`` go to torchvision
unchanged and are not checked here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from vision.errors import ConfigError

Check = Callable[[Any], bool]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(lo: float) -> tuple[Check, str]:
    return (lambda v: _finite(v) and v >= lo), f">= {lo:g}"


def _above(lo: float) -> tuple[Check, str]:
    return (lambda v: _finite(v) and v > lo), f"> {lo:g}"


def _between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> tuple[Check, str]:
    def check(v: Any) -> bool:
        return _finite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return check, f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


_PROBABILITY = _between(0.0, 1.0)

# key -> (check, what it must be).  Optional keys (None allowed by their type) are checked only when set.
RULES: dict[str, tuple[Check, str]] = {
    "data.batch_size": _at_least(1),
    "data.num_workers": _at_least(0),
    "data.epoch_length": _at_least(1),
    "data.class_cap": _at_least(1),
    "data.class_power": _between(0.0, 1.0),
    "data.repeat_threshold": _at_least(0.0),
    "data.crop_margin": _at_least(0.0),
    "data.crop_min_size": _at_least(0),
    "data.crop_pct": _between(0.0, 1.0, lo_open=True),
    "data.augment.hflip": _PROBABILITY,
    "data.augment.vflip": _PROBABILITY,
    "data.augment.rotate90": _PROBABILITY,
    "data.augment.crop": _PROBABILITY,
    "data.augment.color_jitter": _at_least(0.0),
    "data.augment.autoaugment_reference_size": _at_least(1),
    "model.num_classes": _at_least(0),
    "model.fpn_channels": _at_least(1),
    "model.frozen_stages": _at_least(-1),
    "model.max_size": _at_least(1),
    "model.score_thresh": _PROBABILITY,
    "model.nms_thresh": _PROBABILITY,
    "model.detections_per_img": _at_least(1),
    "model.image_size": _at_least(1),
    "model.label_smoothing": _between(0.0, 1.0, hi_open=True),
    "model.drop_rate": _between(0.0, 1.0, hi_open=True),
    "model.se_ratio": _between(0.0, 1.0),
    "model.mixup": _at_least(0.0),
    "model.cutmix": _at_least(0.0),
    "model.seg_channels": _at_least(1),
    "model.box_head_dim": _at_least(1),
    "model.mask_head_channels": _at_least(1),
    "model.ignore_index": _at_least(0),
    "model.dice_weight": _at_least(0.0),
    "train.max_iters": _at_least(1),
    "train.time_budget_min": _above(0.0),
    "train.lr": _above(0.0),
    "train.momentum": _between(0.0, 1.0),
    "train.weight_decay": _at_least(0.0),
    "train.warmup_iters": _at_least(0),
    "train.warmup_factor": _between(0.0, 1.0, lo_open=True),
    "train.gamma": _above(0.0),
    "train.grad_accum": _at_least(1),
    "train.clip_grad": _at_least(0.0),
    "train.ema_decay": _between(0.0, 1.0),
    "train.eval_every": _at_least(0),
    "train.ckpt_every_iters": _at_least(0),
    "train.log_every": _at_least(0),
    "train.max_bad_steps": _at_least(1),
    "train.seed": _at_least(0),
    "train.unfreeze_at": _at_least(0),
    "train.layer_decay": _between(0.0, 1.0, lo_open=True),
}

# list-valued keys: every item, and whether the list may be empty
ITEM_RULES: dict[str, tuple[Check, str, bool]] = {
    "model.min_size": (*_at_least(1), True),  # [] is semantic_fpn's "each image at its own size"
    "model.aspect_ratios": (*_above(0.0), False),
    "model.out_indices": (lambda v: isinstance(v, int), "an integer", False),
    "data.augment.scale": (*_above(0.0), False),
    "train.steps": (*_above(0.0), True),
}


_RESIZING_ARCHS = ("retinanet", "faster_rcnn", "mask_rcnn")  # torchvision's transform draws from min_size


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _fail(key: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}' must be {what}, got {value!r}")


def validate_config(cfg: Any) -> Any:
    """Raises ``ConfigError`` for the first value out of its range; returns ``cfg`` when all are fine."""
    for key, (check, what) in RULES.items():
        value = _get(cfg, key)
        if value is not None and not check(value):
            raise _fail(key, what, value)
    for key, (check, what, may_be_empty) in ITEM_RULES.items():
        values = _get(cfg, key)
        if values is None:
            continue
        if not values and not may_be_empty:
            raise ConfigError(f"config key '{key}' must not be an empty list")
        for i, v in enumerate(values):
            if not check(v):
                raise _fail(f"{key}[{i}]", what, v)
    _check_special(cfg)
    return cfg


def _check_special(cfg: Any) -> None:
    t, d, m = cfg.train, cfg.data, cfg.model
    if not m.min_size and m.arch in _RESIZING_ARCHS:
        raise ConfigError(
            f"config key 'model.min_size' must not be an empty list for model.arch={m.arch}"
            " (only semantic_fpn takes [] for images at their own size)"
        )
    if t.max_iters is None and t.epochs < 1:
        # the trainer would run max(1, epochs) epochs: say so instead of training one epoch
        raise ConfigError(f"config key 'train.epochs' must be >= 1 (or set train.max_iters), got {t.epochs}")
    if t.epochs < 0:
        raise _fail("train.epochs", ">= 0", t.epochs)
    scale = d.augment.scale
    if len(scale) != 2 or scale[0] > scale[1]:
        raise ConfigError(f"config key 'data.augment.scale' must be [low, high] with low <= high, got {d.augment.scale}")
    if m.anchor_sizes is not None:
        for i, level in enumerate(m.anchor_sizes):
            if not level:
                raise ConfigError(f"config key 'model.anchor_sizes[{i}]' must not be an empty list")
            for j, size in enumerate(level):
                if size < 1:
                    raise _fail(f"model.anchor_sizes[{i}][{j}]", ">= 1", size)
    if d.class_names is not None:
        seen: set[str] = set()
        for name in d.class_names:
            if name in seen:
                raise ConfigError(f"config key 'data.class_names' names {name!r} twice")
            seen.add(name)
    if not cfg.name:
        raise ConfigError("config key 'name' must not be empty (it names the run folder)")
