"""A timm ``features_only`` network under a torchvision ``FeaturePyramidNetwork``.

The module layout (``body`` = the timm feature network, ``fpn`` = the pyramid) is the one of
torchvision's ``BackboneWithFPN``, so a torchvision detection state_dict maps onto it key for key
when the timm network has torchvision's layer names (timm's ResNets do).  Any timm name that supports
``features_only`` works; the pyramid levels are chosen by stride, not by index, because timm models
expose different numbers of feature levels (ConvNeXt has no stride-2 level, ResNet has one).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import FrozenBatchNormAct2d, freeze_batch_norm_2d
from torch import nn
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from vision.errors import ConfigError, VisionError

# Strides of the backbone levels fed to the FPN, as torchvision's detection models use them.
RETINANET_STRIDES = (8, 16, 32)  # C3-C5 -> P3-P5, then P6, P7 from the extra block
RCNN_STRIDES = (4, 8, 16, 32)  # C2-C5 -> P2-P5, then P6 by max-pool

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")

# Prefixes under which a backbone may sit in a checkpoint that holds more than the backbone
# (a torchvision or vision detection model, a DDP / compiled wrapper).
_BACKBONE_PREFIXES = ("module.", "_orig_mod.", "backbone.body.", "body.")


class TimmFPNBackbone(nn.Module):
    """timm features -> FPN; ``out_channels`` tells torchvision's detectors the head width.

    ``forward`` returns an ordered dict with keys ``"0"``, ``"1"``, ... for the backbone levels
    (the names torchvision's ``MultiScaleRoIAlign`` defaults to) followed by the extra levels
    (``"p6"``, ``"p7"`` or ``"pool"``), as ``BackboneWithFPN`` does.
    """

    def __init__(
        self,
        body: nn.Module,
        in_channels_list: Sequence[int],
        out_channels: int,
        extra_blocks: ExtraFPNBlock | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            list(in_channels_list), out_channels, extra_blocks=extra_blocks, norm_layer=norm_layer
        )
        self.out_channels = out_channels
        self.in_channels_list = list(in_channels_list)
        self.featmap_names = [str(i) for i in range(len(in_channels_list))]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.body(x)
        out = OrderedDict()
        for name, f, c in zip(self.featmap_names, feats, self.in_channels_list):
            if f.shape[1] != c and f.shape[-1] == c:  # a channels-last feature network
                f = f.permute(0, 3, 1, 2)
            out[name] = f
        return self.fpn(out)


def _is_local_file(spec: str) -> bool:
    if spec.startswith("hf-hub:"):
        return False
    p = Path(spec).expanduser()
    return p.suffix.lower() in WEIGHT_SUFFIXES or "/" in spec or os.sep in spec or p.is_file()


def _arch_of(name: str) -> str:
    name = name.split(":", 1)[-1]  # hf-hub:org/name
    return name.split("/")[-1].split(".", 1)[0]


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _hub_error(name: str, reason: str) -> VisionError:
    return VisionError(
        f"cannot load pretrained backbone weights '{name}': {reason}; download them where the network "
        "is reachable, or give a local file: model.pretrained=/path/to/weights.safetensors (or .pth/.bin)"
    )


def _cached(cfg: object) -> bool:
    """Whether timm would find the weights of ``cfg`` without the network."""
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
        names += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        return any(
            isinstance(try_to_load_from_cache(hub_id, n, cache_dir=constants.HF_HUB_CACHE), str) for n in names
        )
    url = getattr(cfg, "url", None)
    return bool(url) and (Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name).is_file()


def _check_hub_reachable(name: str) -> None:
    """Fails at once, with a way out, when weights would have to come from a network we may not use."""
    if name.startswith("hf-hub:"):
        return  # not in timm's registry; the hub client itself fails fast when offline
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError as e:  # an unknown tag
        raise ConfigError(f"model.pretrained '{name}': {e} (see timm.list_pretrained())") from None
    if cfg is not None and _offline() and not _cached(cfg):
        raise _hub_error(name, "HF_HUB_OFFLINE is set and the file is not in the local cache")


def _read_backbone_file(path: Path) -> dict[str, torch.Tensor]:
    """Reads a weights file and strips the prefixes that wrap a backbone in larger checkpoints."""
    if not path.is_file():
        raise VisionError(f"{path}: pretrained weights file not found")
    try:
        sd = timm.models.load_state_dict(str(path))
    except Exception as e:
        raise VisionError(f"{path}: cannot read pretrained weights ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VisionError(f"{path}: pretrained weights must be a state_dict of tensors")
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            # keep only the backbone when the file holds a whole detector
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def _source_candidates(key: str) -> list[str]:
    """Names a features-model key may have in a full-model state_dict.

    timm's feature wrappers rename flattened children (``stages.0`` -> ``stages_0``) or nest the
    model (``model.``); the state_dict is in the unwrapped model's names.
    """
    out = [key]
    head, _, rest = key.partition(".")
    for i, ch in enumerate(head):
        if ch == "_":
            out.append(f"{head[:i]}.{head[i + 1 :]}" + (f".{rest}" if rest else ""))
    if key.startswith("model."):
        out.append(key[len("model.") :])
    return out


def _missing_backbone_keys(body: nn.Module, sd: dict[str, torch.Tensor]) -> list[str]:
    return [
        k
        for k in body.state_dict()
        if not k.endswith("num_batches_tracked") and not any(c in sd for c in _source_candidates(k))
    ]


def create_feature_net(
    name: str,
    out_indices: Sequence[int] | None = None,
    strides: Sequence[int] = RCNN_STRIDES,
    pretrained: str | None = None,
) -> nn.Module:
    """``timm.create_model(name, features_only=True)`` with the levels of ``strides`` (or ``out_indices``).

    ``pretrained``: a timm hub name (``resnet50.a1_in1k``) of the same architecture as ``name``, or a
    local ``.safetensors`` / ``.pth`` / ``.bin`` file in timm's or torchvision's layout (a whole
    torchvision or vision detector checkpoint works too: its backbone is taken).  Every backbone
    weight must be found in a local file; a partial match is an error rather than a silent mix of
    pretrained and random layers.
    """
    if out_indices is None:
        out_indices = _indices_for_strides(name, strides)
    kwargs = dict(features_only=True, out_indices=tuple(out_indices))
    try:
        if pretrained is None:
            return timm.create_model(name, pretrained=False, **kwargs)
        if _is_local_file(pretrained):
            path = Path(pretrained).expanduser()
            sd = _read_backbone_file(path)
            body = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd, file=str(path)), **kwargs
            )
            missing = _missing_backbone_keys(body, sd)
            if missing:
                raise VisionError(
                    f"{path}: {len(missing)} weights of backbone '{name}' are not in the file "
                    f"(e.g. {', '.join(missing[:3])}): is it a checkpoint of another architecture?"
                )
            return body
        if _arch_of(pretrained) != _arch_of(name):
            raise ConfigError(
                f"model.pretrained '{pretrained}' is not a '{_arch_of(name)}' model (model.backbone is "
                f"'{name}'): name weights of the same architecture, e.g. '{_arch_of(name)}.<tag>'"
            )
        _check_hub_reachable(pretrained)
        try:
            return timm.create_model(pretrained, pretrained=True, **kwargs)
        except (OSError, RuntimeError, ValueError) as e:
            if isinstance(e, RuntimeError) and "Unknown model" in str(e):
                raise
            raise _hub_error(pretrained, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"unknown timm model '{name}' (see timm.list_models())") from None
        raise


def _indices_for_strides(name: str, strides: Sequence[int]) -> list[int]:
    """The feature_info indices of the levels with the given strides (built on the meta device)."""
    probe = None
    for device in ("meta", "cpu"):  # meta allocates nothing; a few models cannot initialise there
        try:
            with torch.device(device):
                probe = timm.create_model(name, pretrained=False, features_only=True)
            break
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ConfigError(f"unknown timm model '{name}' (see timm.list_models())") from None
            error: Exception = e
        except Exception as e:
            error = e
    if probe is None:
        raise ConfigError(f"timm model '{name}' cannot be used as a feature extractor ({error})")
    reductions = [lv["reduction"] for lv in probe.feature_info.info]  # every level, not the default ones
    if all(s in reductions for s in strides):
        return [reductions.index(s) for s in strides]
    # an unusual network: take its deepest levels
    n = min(len(strides), len(reductions))
    return list(range(len(reductions) - n, len(reductions)))


def _module_path(body: nn.Module, name: str) -> str:
    """The path of a feature_info module inside the (possibly flattened) timm feature network."""
    for cand in _source_candidates_inverse(name):
        try:
            body.get_submodule(cand)
            return cand
        except AttributeError:
            continue
    raise VisionError(f"cannot locate stage '{name}' in the backbone to freeze it")


def _source_candidates_inverse(name: str) -> list[str]:
    out = [name]
    parts = name.split(".")
    for i in range(1, len(parts)):
        out.append("_".join(parts[: i + 1]) + ("." + ".".join(parts[i + 1 :]) if i + 1 < len(parts) else ""))
    out.append("model." + name)
    return out


def freeze_stages(body: nn.Module, frozen_stages: int) -> None:
    """Stops training the stem and the first ``frozen_stages`` stages (``0``: the stem only).

    Stage k is the block that brings the stride to 2**(k+1) (stage 1 = stride 4, as ResNet's layer1),
    so ``frozen_stages=1`` on a ResNet freezes what torchvision's ``trainable_layers=3`` freezes.
    Parameters are registered in execution order in timm's convolutional networks, so the frozen part
    is a prefix of ``named_parameters()``.  Batch norms in it are made frozen too, so that their
    running statistics stay those of the pretrained weights.
    """
    if frozen_stages < 0:
        return
    levels = body.feature_info.info  # every level, not only the returned ones
    modules = [lv["module"] for lv in levels]
    reductions = [lv["reduction"] for lv in levels]
    params = [n for n, _ in body.named_parameters()]
    if frozen_stages == 0:
        # everything before the first stride-4 (or deeper) stage
        first = next(i for i, r in enumerate(reductions) if r >= 4)
        prefix = _module_path(body, modules[first]) + "."
        end = next((i for i, n in enumerate(params) if n.startswith(prefix)), len(params))
    elif 2 ** (frozen_stages + 1) > max(reductions):
        end = len(params)  # every stage
    else:
        last = max(i for i, r in enumerate(reductions) if r <= 2 ** (frozen_stages + 1))
        prefix = _module_path(body, modules[last]) + "."
        hits = [i for i, n in enumerate(params) if n.startswith(prefix)]
        end = hits[-1] + 1 if hits else len(params)
    frozen = set(params[:end])
    for n, p in body.named_parameters():
        if n in frozen:
            p.requires_grad_(False)
    # freeze the norms of the frozen part
    replace = []
    for mname, m in body.named_modules():
        if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            names = [f"{mname}.{pn}" for pn, _ in m.named_parameters(recurse=False)]
            if names and all(n in frozen for n in names):
                replace.append(mname)
    for mname in replace:
        parent_name, _, child = mname.rpartition(".")
        parent = body.get_submodule(parent_name) if parent_name else body
        setattr(parent, child, freeze_batch_norm_2d(getattr(parent, child)))


def build_backbone(
    name: str,
    *,
    fpn_channels: int = 256,
    levels: str = "rcnn",
    out_indices: Sequence[int] | None = None,
    pretrained: str | None = None,
    frozen_stages: int = -1,
    frozen_bn: bool = False,
    fpn_norm: str | None = None,
    bn_eps: float | None = None,
) -> TimmFPNBackbone:
    """timm backbone + FPN for ``levels`` ``"retinanet"`` (P3-P7) or ``"rcnn"`` (P2-P6).

    ``fpn_norm`` (``"bn"`` or ``"gn"``) puts a norm after each FPN convolution, which a network
    trained from scratch needs far more than one starting from pretrained weights.  ``bn_eps`` replaces
    the ``eps`` of every batch norm in the timm network (``set_batch_norm_eps``).
    """
    if levels == "retinanet":
        strides, extra = RETINANET_STRIDES, LastLevelP6P7(fpn_channels, fpn_channels)
    elif levels == "rcnn":
        strides, extra = RCNN_STRIDES, LastLevelMaxPool()
    else:
        raise ValueError(f"levels must be 'retinanet' or 'rcnn', got {levels!r}")
    body = create_feature_net(name, out_indices, strides, pretrained)
    if frozen_bn:
        body = freeze_batch_norm_2d(body)
    freeze_stages(body, frozen_stages)
    if bn_eps is not None:
        set_batch_norm_eps(body, bn_eps)
    return TimmFPNBackbone(body, body.feature_info.channels(), fpn_channels, extra, norm_layer(fpn_norm))


def backbone_from_config(cfg: Any, levels: str) -> TimmFPNBackbone:
    """``build_backbone`` with the backbone keys of a ``ModelConfig`` (every FPN model builds its own so)."""
    return build_backbone(
        cfg.backbone, fpn_channels=cfg.fpn_channels, levels=levels, out_indices=cfg.out_indices,
        pretrained=cfg.pretrained, frozen_stages=cfg.frozen_stages, frozen_bn=cfg.frozen_bn, fpn_norm=cfg.fpn_norm,
        bn_eps=cfg.bn_eps,
    )


def set_batch_norm_eps(module: nn.Module, eps: float) -> int:
    """Sets ``eps`` on every batch norm (trainable or frozen) under ``module``; returns how many.

    Weights are tied to the ``eps`` they were trained with: torchvision's COCO_V1 detection weights come
    from frozen norms without one, and torchvision runs them with ``eps=0`` (``overwrite_eps``), while
    timm's norms default to 1e-5, which moves scores and box corners slightly.
    """
    count = 0
    for m in module.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d, FrozenBatchNormAct2d)):
            m.eps = float(eps)
            count += 1
    return count


def norm_layer(kind: str | None) -> Callable[[int], nn.Module] | None:
    """``None`` | ``"bn"`` | ``"gn"`` -> a norm constructor taking the channel count (GroupNorm: 32 groups)."""
    if kind is None or kind == "none":
        return None
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda channels: nn.GroupNorm(math.gcd(32, channels), channels)
    raise ConfigError(f"unknown norm '{kind}' (expected bn, gn or none)")
