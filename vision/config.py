"""Configs: YAML files -> typed dataclasses, with dotted ``key=value`` overrides.

Every option and its default lives in the dataclasses below, so there is one place to read what a
recipe can set.  A YAML file only states what differs from the defaults; ``_base_`` names files to
inherit from (paths relative to the including file).  Unknown keys are rejected with their dotted
name, so a typo never silently falls back to a default.  The resolved config is saved with every run.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vision.atomic import atomic_write
from vision.config_checks import validate_config
from vision.errors import ConfigError


@dataclass
class SplitConfig:
    """Where one split of a data set lives.

    ``format`` selects the reader: ``coco`` (``ann`` is a JSON file), ``voc`` (``ann`` is the XML folder,
    ``ids`` an optional ImageSets list file) or ``yolo`` (``ann`` is the label-file folder, ``names`` the
    class-names file).  Semantic segmentation also reads ``masks`` (``ann`` is a folder of class-index
    PNGs matched to ``images`` by file stem) and ``mask_list`` (``ann`` is a file of ``image mask`` lines).
    Relative paths are taken from ``data.root``.
    """

    format: str = "coco"
    ann: str = ""
    images: str = ""
    ids: str | None = None
    names: str | None = None
    # COCO / VOC: accept image file names that are absolute or climb out of `images` with '..'
    allow_outside_paths: bool = False


@dataclass
class AugmentConfig:
    """Training-time augmentation (albumentations; AutoAugment policies for detection)."""

    hflip: float = 0.5
    vflip: float = 0.0
    rotate90: float = 0.0
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])
    crop: float = 0.0
    color_jitter: float = 0.0
    autoaugment: Any = None  # None, a policy name ("v0".."v3"), or a list of sub-policies
    autoaugment_reference_size: int | None = None  # scale AutoAugment's pixel constants (set for ~640 px)


@dataclass
class DataConfig:
    root: str = ""
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    class_names: list[str] | None = None
    with_masks: bool = False
    skip_difficult: bool = False
    batch_size: int = 2
    num_workers: int = 2
    sampler: str = "uniform"  # uniform | class_balanced | repeat_factor
    epoch_length: int | None = None  # draws per epoch for the class-balanced sampler
    class_cap: int | None = None  # class-balanced: at most this many distinct images per class
    class_power: float = 0.0  # class-balanced: pick class c with prob ~ n(c)^p (0 balanced, 0.5 square-root)
    repeat_threshold: float = 0.001  # repeat-factor: LVIS threshold t
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # classification: splits may also be `folder` (a sub-folder per class) or `csv` (path,label[,label...]);
    # a detection split yields one crop per box, widened by crop_margin of its size on every side.
    # augment.autoaugment takes timm's policy names ("original", "rand-m9-mstd0.5"), augment.scale the
    # RandomResizedCrop area range; crop_pct is the eval centre crop (None: timm's default)
    crop_margin: float = 0.1
    crop_min_size: int = 0  # crops narrower than this (pixels) widen around the box: object size stays visible
    crop_pct: float | None = None
    crowd_ignore: bool = True  # semantic masks from COCO: crowd regions -> model.ignore_index


@dataclass
class ModelConfig:
    arch: str = "retinanet"  # retinanet | faster_rcnn | mask_rcnn | semantic_fpn | classifier
    backbone: str = "resnet50"
    pretrained: str | None = None  # timm hub name or a local .safetensors / .pth file
    num_classes: int = 0  # 0: taken from the data set
    out_indices: list[int] | None = None
    fpn_channels: int = 256
    frozen_stages: int = -1  # -1: nothing frozen; k: stem and the first k stages frozen
    frozen_bn: bool = False
    bn_eps: float | None = None  # backbone batch norms' eps; None: timm's (1e-5); torchvision's COCO_V1 weights: 0
    fpn_norm: str | None = None  # None | bn | gn: a norm after each FPN convolution (helps from scratch)
    head_norm: str | None = None  # RetinaNet: None | gn | bn in the head's convolutions (as torchvision's v2)
    box_loss: str | None = None  # RetinaNet: l1 (torchvision's default) | smooth_l1 | giou | diou | ciou
    anchor_sizes: list[list[int]] | None = None
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    min_size: list[int] = field(default_factory=lambda: [800])
    max_size: int = 1333
    score_thresh: float | None = None
    nms_thresh: float | None = None
    detections_per_img: int | None = None  # None: torchvision's default for the arch (100, RetinaNet 300)
    # Faster / Mask R-CNN head widths; None: torchvision's (a 1024-wide box head, 256-channel mask
    # convolutions), the layout its COCO weights have.  Narrower heads train from scratch much faster.
    box_head_dim: int | None = None
    mask_head_channels: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed on to the torchvision model
    # a whole checkpoint of the same arch (vision or torchvision) to fine-tune from; class layers re-created
    init_from: str | None = None
    # classifier: input side, loss mode and regularisation (mixup / cutmix: timm's Mixup alphas, 0 = off)
    image_size: int = 224
    multi_label: bool = False
    label_smoothing: float = 0.0
    drop_rate: float = 0.0
    se_ratio: float = 0.0625
    global_pool: str = "avg"
    mixup: float = 0.0
    cutmix: float = 0.0
    # semantic_fpn: decoder width, the label that is never learned or scored, and Dice on top of cross-entropy
    seg_channels: int = 128
    ignore_index: int = 255
    dice_weight: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 12
    max_iters: int | None = None
    time_budget_min: float | None = None  # wall clock; the schedule's horizon follows measured speed
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_factor: float = 0.001
    schedule: str = "cosine"  # cosine | step | constant
    steps: list[float] = field(default_factory=lambda: [0.67, 0.89])  # step decay, as fractions of training
    gamma: float = 0.1
    grad_accum: int = 1
    clip_grad: float | None = None
    amp: bool = False
    channels_last: bool = False  # NHWC weights and activations: oneDNN reorders less (a few % on the BCCD recipe)
    ema: bool = False
    ema_decay: float = 0.9998
    ema_warmup: bool = True  # timm's decay warm-up: short runs average recent weights, not the init
    eval_every: int = 1
    ckpt_every_iters: int = 500
    log_every: int = 20
    max_bad_steps: int = 5
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    freeze: str | None = None  # comma-separated parameter-name prefixes, e.g. "backbone.body"
    unfreeze_at: int | None = None  # epoch at which `freeze` is lifted (None: never)
    layer_decay: float | None = None


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_tree(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Reads a YAML config and the ``_base_`` files it names, later files overriding earlier ones.

    A file that includes itself, directly or through others, is a ``ConfigError`` naming the loop.
    """
    path = Path(path)
    key = path.resolve()
    if key in _chain:
        loop = " -> ".join(str(p) for p in (*_chain[_chain.index(key):], key))
        raise ConfigError(f"{path}: _base_ includes itself ({loop})")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: _base_ must be a file name or a list of file names, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _merge(merged, load_yaml_tree(path.parent / base, (*_chain, key)))
    return _merge(merged, data)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; converts only where no information is lost."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 (PyYAML) reads 1e-5 and 3E4, without a dot, as strings
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=0.02", "model.min_size=[480,512]"]`` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. train.lr=0.02)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' sets a key inside a value")
        node[parts[-1]] = value
    return tree


def merge_overrides(data: dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    """A config dict (a checkpoint's) with dotted ``key=value`` overrides applied on top."""
    return config_from_dict(_merge(data, parse_overrides(list(overrides))))


def config_from_dict(data: dict[str, Any]) -> Config:
    """A checked ``Config``: types as the dataclasses declare them, values in their ranges."""
    return validate_config(_build(Config, data))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file (with its ``_base_`` chain) <- command-line overrides."""
    data = load_yaml_tree(path) if path else {}
    data = _merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Writes the resolved config, so a run can be reproduced without the files it came from."""
    with atomic_write(path, "w") as f:
        f.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def resolve_path(root: str, path: str | None) -> str | None:
    """A data path relative to ``data.root`` (absolute paths and empty roots pass through)."""
    if not path:
        return path
    p = Path(path).expanduser()
    if p.is_absolute() or not root:
        return str(p)
    return str(Path(root).expanduser() / p)
