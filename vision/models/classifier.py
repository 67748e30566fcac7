"""Image classifier: a timm backbone's last feature map -> squeeze-excitation -> global pooling -> linear.

The pieces are timm's own (``SEModule``, ``SelectAdaptivePool2d``, ``Mixup``, ``SoftTargetCrossEntropy``);
this module wires them under the trainer's torchvision-style convention, so classification needs no
trainer of its own:

- training mode: ``model(images, targets) -> {"loss_cls": loss}``, where ``images`` is a list of
  float CHW tensors in [0, 1] (or one stacked tensor) and each target is ``{"label": ...}``: an int64
  class index (0-based) in single-label mode, a float multi-hot vector of length K in multi-label mode;
- eval mode: ``model(images) -> [{"scores": probs [K], "labels": top-k class indices [k]}]`` with
  softmax (single-label) or sigmoid (multi-label) probabilities and k = min(5, K), best first.

Normalisation (the backbone's pretrained mean / std) happens inside, so inputs are plain [0, 1] images
as for the detectors, and a list of differently sized images is resized to ``image_size``.  The
feature network sits at ``backbone.body`` as in the detectors: ``train.freeze=backbone`` means the same
for both, and a classifier checkpoint given as a detector's ``model.pretrained`` (or the other way
round) finds its backbone weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup, resolve_data_config
from timm.layers import SelectAdaptivePool2d, SEModule, freeze_batch_norm_2d
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from vision.config import ModelConfig
from vision.errors import ConfigError
from vision.models.backbone import create_feature_net, freeze_stages, set_batch_norm_eps
from vision.models.weights import ARCH_SIGNATURES, CLASS_DEPENDENT_PREFIXES

TOP_K = 5

# so that load_model_weights recognises classifier checkpoints and re-heads them for a new class count
if ("head.se.", "classifier") not in ARCH_SIGNATURES:
    ARCH_SIGNATURES.append(("head.se.", "classifier"))
if "head.fc." not in CLASS_DEPENDENT_PREFIXES:
    CLASS_DEPENDENT_PREFIXES.append("head.fc.")


class ClassifierHead(nn.Module):
    """SE block on the last feature map, global pooling, dropout, linear layer (logits)."""

    def __init__(
        self, in_channels: int, num_classes: int, se_ratio: float = 0.0625, pool_type: str = "avg",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.se = SEModule(in_channels, rd_ratio=se_ratio)
        self.pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_channels * self.pool.feat_mult(), num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.pool(self.se(features))))


class FeatureBackbone(nn.Module):
    """Holds the timm feature network at ``body``, the place detectors keep theirs."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body(x)


class Classifier(nn.Module):
    """timm feature network + ``ClassifierHead``, with its losses (see the module docstring)."""

    def __init__(
        self,
        body: nn.Module,
        num_classes: int,
        *,
        image_size: int = 224,
        multi_label: bool = False,
        label_smoothing: float = 0.0,
        se_ratio: float = 0.0625,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ):
        super().__init__()
        self.backbone = FeatureBackbone(body)
        self.channels = int(body.feature_info.channels()[-1])
        self.head = ClassifierHead(self.channels, num_classes, se_ratio, global_pool, drop_rate)
        self.num_classes = num_classes
        self.image_size = int(image_size)
        self.multi_label = multi_label
        self.label_smoothing = float(label_smoothing)
        # not saved: they follow the backbone, and checkpoints stay loadable whatever the statistics
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.mixup = (
            Mixup(
                mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                num_classes=num_classes, multi_label=multi_label,
            )
            if (mixup > 0 or cutmix > 0)
            else None
        )

    def batch(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """A normalised [B, 3, H, W] batch; images of different sizes are resized to ``image_size``."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            x = images
        else:
            images = list(images)
            if not images:
                raise ValueError("empty batch")
            if any(img.shape != images[0].shape for img in images):
                size = (self.image_size, self.image_size)
                images = [
                    F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
                    for img in images
                ]
            x = torch.stack(images)
        x = x.float()
        return (x - self.mean) / self.std

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of a normalised batch."""
        f = self.backbone(x)[-1]
        if f.shape[1] != self.channels and f.shape[-1] == self.channels:  # a channels-last feature network
            f = f.permute(0, 3, 1, 2)
        return self.head(f)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (single-label; soft targets after mixup) or binary cross-entropy (multi-label)."""
        if target.is_floating_point() and target.ndim == 2 and not self.multi_label:
            return SoftTargetCrossEntropy()(logits.float(), target)
        if self.multi_label:
            target = target.float()
            if self.label_smoothing and self.mixup is None:  # Mixup smooths its own targets
                target = target * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
            return F.binary_cross_entropy_with_logits(logits.float(), target)
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)

    def forward(
        self, images: torch.Tensor | Sequence[torch.Tensor], targets: Sequence[dict[str, Any]] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        x = self.batch(images)
        if self.training:
            if targets is None:
                raise ValueError("in training mode the classifier needs targets ([{'label': ...}, ...])")
            y = torch.stack([torch.as_tensor(t["label"]) for t in targets]).to(x.device)
            if not self.multi_label:
                y = y.long().view(-1)
            if self.mixup is not None and len(x) % 2 == 0:  # timm's Mixup pairs samples: even batches only
                x, y = self.mixup(x, y)
            return {"loss_cls": self.loss(self.logits(x), y)}
        logits = self.logits(x).float()
        probs = logits.sigmoid() if self.multi_label else logits.softmax(dim=1)
        top = probs.topk(min(TOP_K, self.num_classes), dim=1).indices
        return [{"scores": p, "labels": t} for p, t in zip(probs, top)]


def build_classifier(cfg: ModelConfig) -> Classifier:
    """The classifier of ``cfg``: ``model.backbone`` (any timm name) with ``model.pretrained`` weights."""
    if cfg.num_classes <= 0:
        raise ConfigError(
            f"model.num_classes is {cfg.num_classes}: set it to the number of classes, or let the data set fill it in"
        )
    out_indices = cfg.out_indices[-1:] if cfg.out_indices else [-1]
    body = create_feature_net(cfg.backbone, out_indices=out_indices, pretrained=cfg.pretrained)
    if cfg.frozen_bn:
        body = freeze_batch_norm_2d(body)
    freeze_stages(body, cfg.frozen_stages)
    if cfg.bn_eps is not None:
        set_batch_norm_eps(body, cfg.bn_eps)
    data_cfg = resolve_data_config({}, model=body)
    return Classifier(
        body,
        cfg.num_classes,
        image_size=cfg.image_size,
        multi_label=cfg.multi_label,
        label_smoothing=cfg.label_smoothing,
        se_ratio=cfg.se_ratio,
        global_pool=cfg.global_pool,
        drop_rate=cfg.drop_rate,
        mixup=cfg.mixup,
        cutmix=cfg.cutmix,
        mean=data_cfg.get("mean", (0.485, 0.456, 0.406)),
        std=data_cfg.get("std", (0.229, 0.224, 0.225)),
    )



__all__ = ["Classifier", "ClassifierHead", "FeatureBackbone", "build_classifier"]
