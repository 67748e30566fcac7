"""Semantic segmentation: a Panoptic-FPN semantic head on the timm backbone + torchvision FPN.

Each pyramid level P2-P5 goes through conv(+GN)+ReLU stages, each followed by a 2x upsampling, until
it reaches the finest level's resolution (1/4 of the input); the levels are summed and a 1x1 classifier
gives logits at 1/4, upsampled bilinearly to the input (Kirillov et al., Panoptic Feature Pyramid
Networks, 2019).  The model follows torchvision's detector convention so the one trainer drives it:
images are a list of float [0, 1] tensors of any sizes; it normalises, optionally resizes, pads to a
multiple of 32 itself, and crops every prediction back to its own image.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vision.config import ModelConfig
from vision.errors import ConfigError
from vision.models.backbone import TimmFPNBackbone, backbone_from_config
from vision.models.detection import checked_kwargs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv_gn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(math.gcd(32, max(1, out_channels // 2)), out_channels),  # >= 2 channels per group
        nn.ReLU(inplace=True),
    ]


class SemanticFPNHead(nn.Module):
    """Pyramid levels (finest first, each twice the stride of the one before) -> logits at the finest."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, strides: Sequence[int]):
        super().__init__()
        base = strides[0]
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            steps = round(math.log2(stride / base))
            layers: list[nn.Module] = []
            for k in range(max(1, steps)):
                layers += _conv_gn_relu(in_channels if k == 0 else channels, channels)
                if steps > 0:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](features[0])
        for head, f in zip(self.scale_heads[1:], features[1:]):
            y = head(f)
            if y.shape[-2:] != out.shape[-2:]:  # odd sizes: the finest level sets the grid
                y = F.interpolate(y, size=out.shape[-2:], mode="bilinear", align_corners=False)
            out = out + y
        return self.classifier(out)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Soft Dice over classes (mean of 1 - Dice per class), ignored pixels left out of both sums."""
    num_classes = logits.shape[1]
    valid = target != ignore_index
    probs = logits.float().softmax(1) * valid[:, None]
    onehot = F.one_hot(torch.where(valid, target, 0), num_classes).permute(0, 3, 1, 2).float() * valid[:, None]
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    return (1.0 - (2.0 * inter + 1.0) / (denom + 1.0)).mean()


class SemanticFPN(nn.Module):
    """Backbone + FPN + semantic head; losses in training, per-image class maps in eval mode.

    ``num_classes`` counts background (class 0) too.  ``min_size`` (one picked at random per training
    batch, the last at inference) and ``max_size`` resize as torchvision's detectors do; an empty
    ``min_size`` leaves images at their own size.  Set ``return_probs`` for class probabilities too.
    """

    def __init__(
        self,
        backbone: TimmFPNBackbone,
        num_classes: int,
        *,
        channels: int = 128,
        ignore_index: int = 255,
        dice_weight: float = 0.0,
        min_size: Sequence[int] = (),
        max_size: int | None = None,
        size_divisible: int = 32,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ):
        super().__init__()
        self.backbone = backbone
        strides = list(backbone.body.feature_info.reduction())
        self.head = SemanticFPNHead(backbone.out_channels, channels, num_classes, strides)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.dice_weight = dice_weight
        self.min_size = tuple(int(s) for s in min_size)
        self.max_size = max_size
        self.size_divisible = max(size_divisible, max(strides))
        self.return_probs = False
        self.register_buffer("image_mean", torch.tensor(image_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(-1, 1, 1), persistent=False)

    # input handling -------------------------------------------------------------------------------

    def _scaled_size(self, h: int, w: int) -> tuple[int, int]:
        if not self.min_size:
            return h, w
        size = random.choice(self.min_size) if self.training else self.min_size[-1]
        scale = size / min(h, w)
        if self.max_size:
            scale = min(scale, self.max_size / max(h, w))
        return max(1, round(h * scale)), max(1, round(w * scale))

    def _batch(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalised, resized images padded into one tensor; each image's size in it."""
        sizes = [self._scaled_size(*img.shape[-2:]) for img in images]
        d = self.size_divisible
        ph = math.ceil(max(h for h, _ in sizes) / d) * d
        pw = math.ceil(max(w for _, w in sizes) / d) * d
        batch = images[0].new_zeros((len(images), 3, ph, pw))
        for i, (img, (h, w)) in enumerate(zip(images, sizes)):
            x = (img - self.image_mean) / self.image_std
            if x.shape[-2:] != (h, w):
                x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            batch[i, :, :h, :w] = x
        return batch, sizes

    def _batch_targets(self, targets: Sequence[dict], sizes: list[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
        """Class maps resized (nearest) as their images were, padded with the ignore index."""
        out = torch.full((len(targets), *like.shape[-2:]), self.ignore_index, dtype=torch.long, device=like.device)
        for i, (t, (h, w)) in enumerate(zip(targets, sizes)):
            sem = t["sem_seg"].to(like.device)
            if sem.shape[-2:] != (h, w):
                sem = F.interpolate(sem[None, None].float(), size=(h, w), mode="nearest")[0, 0]
            out[i, :h, :w] = sem.long()
        return out

    # forward --------------------------------------------------------------------------------------

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Class logits at the padded input's resolution."""
        features = self.backbone(batch)
        levels = [features[name] for name in self.backbone.featmap_names]
        out = self.head(levels)
        return F.interpolate(out, size=batch.shape[-2:], mode="bilinear", align_corners=False)

    def forward(
        self, images: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        if self.training and targets is None:
            raise ValueError("in training mode the model needs targets (a 'sem_seg' map per image)")
        batch, sizes = self._batch(images)
        logits = self.logits(batch)
        if self.training:
            return self.losses(logits, self._batch_targets(targets, sizes, logits))
        outputs = []
        for i, (img, (h, w)) in enumerate(zip(images, sizes)):
            x = logits[i : i + 1, :, :h, :w]
            if x.shape[-2:] != img.shape[-2:]:
                x = F.interpolate(x, size=img.shape[-2:], mode="bilinear", align_corners=False)
            out = {"sem_seg": x[0].argmax(0)}
            if self.return_probs:
                out["probs"] = x[0].float().softmax(0)
            outputs.append(out)
        return outputs

    def losses(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if not (target != self.ignore_index).any():  # nothing to learn: a zero that keeps the graph
            ce = logits.sum() * 0.0
        else:
            ce = F.cross_entropy(logits.float(), target, ignore_index=self.ignore_index)
        out = {"loss_ce": ce}
        if self.dice_weight > 0:
            out["loss_dice"] = self.dice_weight * dice_loss(logits, target, self.ignore_index)
        return out


def build_semantic_fpn(cfg: ModelConfig) -> SemanticFPN:
    """Semantic FPN on P2-P5 of any timm backbone; ``num_classes`` object classes + background."""
    if cfg.num_classes <= 0:
        raise ConfigError(
            f"model.num_classes is {cfg.num_classes}: set it to the number of classes "
            "(background excluded), or let the data set fill it in"
        )
    backbone = backbone_from_config(cfg, "rcnn")
    return SemanticFPN(
        backbone,
        cfg.num_classes + 1,
        channels=cfg.seg_channels,
        ignore_index=cfg.ignore_index,
        dice_weight=cfg.dice_weight,
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        **checked_kwargs(cfg.kwargs, _semantic_keywords(), "SemanticFPN"),
    )


def _semantic_keywords() -> list[str]:
    fixed = {"self", "backbone", "num_classes", "channels", "ignore_index", "dice_weight", "min_size", "max_size"}
    return [n for n in inspect.signature(SemanticFPN.__init__).parameters if n not in fixed]
