"""NHWC (``channels_last``) weights and activations: the layout oneDNN and cuDNN's tensor cores compute in.

An NCHW model pays a layout reorder around every convolution on a CPU; with NHWC throughout none is
needed.  Training and inference share it, and a state_dict saved from an NHWC model loads into an NCHW
one unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    if torch.is_tensor(x) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def _features_to_nchw(module: nn.Module, args: tuple) -> tuple:
    """RoI heads get NCHW features: torchvision's RoIAlign reads NCHW and would convert every level
    itself, once per pooler (twice in Mask R-CNN)."""
    features = args[0]
    if isinstance(features, dict):
        features = {k: v.contiguous() if torch.is_tensor(v) else v for k, v in features.items()}
        return (features, *args[1:])
    return args


def use_channels_last(model: nn.Module) -> nn.Module:
    """Weights and backbone input in NHWC, RoI heads fed NCHW; the same function, fewer layout reorders.

    Training uses it too: gradients and optimizer state then take the weights' layout, and a state_dict
    saved from it loads into an NCHW model unchanged (``load_state_dict`` copies values, not strides).
    """
    model.to(memory_format=torch.channels_last)
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, nn.Module):
        # the first convolution then reads NHWC too, so no layer works in NCHW
        backbone.register_forward_pre_hook(_to_channels_last)
    roi_heads = getattr(model, "roi_heads", None)
    if isinstance(roi_heads, nn.Module):
        roi_heads.register_forward_pre_hook(_features_to_nchw)
    return model
