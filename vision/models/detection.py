"""RetinaNet, Faster R-CNN and Mask R-CNN: torchvision's detectors on a timm backbone + FPN.

Heads, anchors, box coding, losses, the resize/normalise transform and post-processing are
torchvision's own; this module translates a ``ModelConfig`` into their constructor arguments, and
keeps their box arithmetic in float32 under autocast (``keep_box_math_in_float32``).
``num_classes`` in the config counts object classes; torchvision counts the background too, so the
builders pass ``num_classes + 1`` (label 0 stays background, labels 1..K are the classes).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from vision.config import ModelConfig
from vision.errors import ConfigError
from vision.models.backbone import TimmFPNBackbone, backbone_from_config, norm_layer
from vision.models.roi_pool import ThreadedMultiScaleRoIAlign

# torchvision's default anchors (retinanet.py and faster_rcnn.py `_default_anchorgen`)
RETINANET_ANCHOR_SIZES = [[x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))] for x in [32, 64, 128, 256, 512]]
RCNN_ANCHOR_SIZES = [[32], [64], [128], [256], [512]]
# the regression losses torchvision's ``_box_loss`` knows
BOX_LOSSES = ("l1", "smooth_l1", "giou", "diou", "ciou")


def _backbone(cfg: ModelConfig, levels: str) -> TimmFPNBackbone:
    return backbone_from_config(cfg, levels)


def _num_classes(cfg: ModelConfig) -> int:
    if cfg.num_classes <= 0:
        raise ConfigError(
            f"model.num_classes is {cfg.num_classes}: set it to the number of object classes "
            "(background excluded), or let the data set fill it in"
        )
    return cfg.num_classes + 1


def _anchor_generator(cfg: ModelConfig, default_sizes: list[list[int]], num_levels: int) -> AnchorGenerator:
    sizes = cfg.anchor_sizes if cfg.anchor_sizes is not None else default_sizes
    if len(sizes) != num_levels:
        raise ConfigError(
            f"model.anchor_sizes has {len(sizes)} levels but the feature pyramid has {num_levels}: "
            "give one list of sizes per level"
        )
    ratios = tuple(float(r) for r in cfg.aspect_ratios)
    return AnchorGenerator(tuple(tuple(int(s) for s in level) for level in sizes), (ratios,) * len(sizes))


def _transform_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    # several min sizes: torchvision's transform picks one at random per batch in training
    return dict(min_size=tuple(int(s) for s in cfg.min_size), max_size=int(cfg.max_size))


def _set(kwargs: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        kwargs[key] = value


def constructor_keywords(detector: type[nn.Module]) -> list[str]:
    """Every keyword a torchvision detector's constructor takes, its ``**kwargs`` followed through.

    ``MaskRCNN`` hands unknown keywords to ``FasterRCNN``, and both R-CNNs and ``RetinaNet`` hand
    theirs to ``GeneralizedRCNNTransform``, which ignores what it does not know; so a misspelt key
    would be dropped without a word unless it is checked against this list.
    """
    names: list[str] = []
    for cls in (*[c for c in detector.__mro__ if c in (MaskRCNN, FasterRCNN, RetinaNet)], GeneralizedRCNNTransform):
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "backbone"):
                names.append(p.name)
    names.append("_skip_resize")  # read from GeneralizedRCNNTransform's **kwargs
    return sorted(set(names) - {"num_classes"})


def _extra_kwargs(cfg: ModelConfig, detector: type[nn.Module]) -> dict[str, Any]:
    """``model.kwargs``, each key checked against what ``detector``'s constructor accepts."""
    return checked_kwargs(cfg.kwargs, constructor_keywords(detector), f"torchvision's {detector.__name__}")


def checked_kwargs(kwargs: dict[str, Any], allowed: list[str], owner: str) -> dict[str, Any]:
    """``kwargs`` if every key is in ``allowed``; else a ConfigError naming the key and the closest match."""
    for key in kwargs:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean 'model.kwargs.{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key 'model.kwargs.{key}': {owner} takes no such argument{hint}"
            )
    return dict(kwargs)


def build_retinanet(cfg: ModelConfig) -> RetinaNet:
    """RetinaNet on P3-P7 (P6 from P5 when the channel counts match, as ``retinanet_resnet50_fpn``)."""
    backbone = _backbone(cfg, "retinanet")
    kwargs: dict[str, Any] = _transform_kwargs(cfg)
    anchors = _anchor_generator(cfg, RETINANET_ANCHOR_SIZES, len(backbone.featmap_names) + 2)
    kwargs["anchor_generator"] = anchors
    if cfg.head_norm not in (None, "none"):
        kwargs["head"] = RetinaNetHead(
            backbone.out_channels, anchors.num_anchors_per_location()[0], _num_classes(cfg),
            norm_layer=norm_layer(cfg.head_norm),
        )
    _set(kwargs, "score_thresh", cfg.score_thresh)
    _set(kwargs, "nms_thresh", cfg.nms_thresh)
    _set(kwargs, "detections_per_img", cfg.detections_per_img)
    kwargs.update(_extra_kwargs(cfg, RetinaNet))
    model = RetinaNet(backbone, _num_classes(cfg), **kwargs)
    if cfg.box_loss is not None:
        if cfg.box_loss not in BOX_LOSSES:
            raise ConfigError(f"model.box_loss={cfg.box_loss}: expected one of {', '.join(BOX_LOSSES)}")
        # torchvision's RetinaNet picks its regression loss from this attribute (v2 sets "giou")
        model.head.regression_head._loss_type = cfg.box_loss
    return keep_box_math_in_float32(model)


def _rcnn_kwargs(cfg: ModelConfig, backbone: TimmFPNBackbone) -> dict[str, Any]:
    kwargs: dict[str, Any] = _transform_kwargs(cfg)
    kwargs["rpn_anchor_generator"] = _anchor_generator(cfg, RCNN_ANCHOR_SIZES, len(backbone.featmap_names) + 1)
    kwargs["box_roi_pool"] = ThreadedMultiScaleRoIAlign(backbone.featmap_names, output_size=7, sampling_ratio=2)
    _set(kwargs, "box_score_thresh", cfg.score_thresh)
    _set(kwargs, "box_nms_thresh", cfg.nms_thresh)
    _set(kwargs, "box_detections_per_img", cfg.detections_per_img)
    return kwargs


def _rcnn_heads(cfg: ModelConfig, backbone: TimmFPNBackbone, with_masks: bool) -> dict[str, nn.Module]:
    """The RoI heads at the widths ``model.box_head_dim`` / ``model.mask_head_channels`` ask for.

    Empty when neither is set, so torchvision builds its own heads (the layout of its COCO weights).
    torchvision takes a head of another width only with its predictor, and then no class count.
    """
    if cfg.mask_head_channels is not None and not with_masks:
        raise ConfigError(f"model.mask_head_channels applies to mask_rcnn, not {cfg.arch}")
    if cfg.box_head_dim is None and cfg.mask_head_channels is None:
        return {}
    num_classes = _num_classes(cfg)
    dim = cfg.box_head_dim or 1024  # torchvision's representation size
    heads: dict[str, nn.Module] = {
        "box_head": TwoMLPHead(backbone.out_channels * 7 * 7, dim),  # the box RoIAlign's 7 x 7
        "box_predictor": FastRCNNPredictor(dim, num_classes),
    }
    if with_masks:
        channels = cfg.mask_head_channels or 256
        heads["mask_head"] = MaskRCNNHeads(backbone.out_channels, [channels] * 4, 1)
        heads["mask_predictor"] = MaskRCNNPredictor(channels, channels, num_classes)
    return heads


def _build_rcnn(cfg: ModelConfig, detector: type[FasterRCNN], with_masks: bool) -> FasterRCNN:
    backbone = _backbone(cfg, "rcnn")
    kwargs = _rcnn_kwargs(cfg, backbone)
    if with_masks:
        kwargs["mask_roi_pool"] = ThreadedMultiScaleRoIAlign(backbone.featmap_names, output_size=14, sampling_ratio=2)
    heads = _rcnn_heads(cfg, backbone, with_masks)
    kwargs.update(heads)
    kwargs.update(_extra_kwargs(cfg, detector))
    num_classes = None if heads else _num_classes(cfg)
    return keep_box_math_in_float32(detector(backbone, num_classes, **kwargs))


def build_faster_rcnn(cfg: ModelConfig) -> FasterRCNN:
    """Faster R-CNN on P2-P6 (P6 by max-pool, used by the RPN only), as ``fasterrcnn_resnet50_fpn``."""
    return _build_rcnn(cfg, FasterRCNN, with_masks=False)


def build_mask_rcnn(cfg: ModelConfig) -> MaskRCNN:
    """Mask R-CNN on P2-P6, as ``maskrcnn_resnet50_fpn``."""
    return _build_rcnn(cfg, MaskRCNN, with_masks=True)


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _HALF_DTYPES else value  # widen only: float64 stays
    if isinstance(value, dict):
        return type(value)((k, _float32(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_float32(v) for v in value)
    return value


def _float32_output_hook(module: nn.Module, args: Any, output: Any) -> Any:
    return _float32(output)


def keep_box_math_in_float32(model: nn.Module) -> nn.Module:
    """Under autocast, hand the FPN features and every head's outputs on as float32.

    torchvision makes anchors in the features' dtype and decodes boxes in the deltas' dtype, and
    builds the mask-target RoIs' image index in the proposals' dtype.  In bfloat16 (8 significant
    bits) a coordinate near 1000 px moves in steps of 4 px and an index above 256 is rounded, which
    puts a mask target on the wrong instance in images holding hundreds of objects.  The convolutions
    and linear layers still run in the autocast dtype: only their results are widened.
    """
    heads = [getattr(model, "backbone", None), getattr(model, "head", None)]
    rpn = getattr(model, "rpn", None)
    roi_heads = getattr(model, "roi_heads", None)
    if rpn is not None:
        heads.append(rpn.head)
    if roi_heads is not None:
        heads += [roi_heads.box_predictor, getattr(roi_heads, "mask_predictor", None)]
    for module in heads:
        if module is not None:
            module.register_forward_hook(_float32_output_hook)
    return model


def drop_float32_hooks(model: nn.Module) -> nn.Module:
    """Removes ``keep_box_math_in_float32``'s hooks, for exports: TorchScript cannot type them, and
    an exported float32 graph has nothing to widen."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if hook is _float32_output_hook:
                del module._forward_hooks[key]
    return model


def detection_arch(model: nn.Module) -> str | None:
    """Which detector a model is, from its class (None for anything else)."""
    if isinstance(model, MaskRCNN):
        return "mask_rcnn"
    if isinstance(model, FasterRCNN):
        return "faster_rcnn"
    if isinstance(model, RetinaNet):
        return "retinanet"
    return None
