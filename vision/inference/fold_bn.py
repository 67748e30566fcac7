"""Folding eval-mode batch norms into the convolutions before them.

A batch norm at inference is a per-channel affine map, so ``bn(conv(x))`` is one convolution with
rescaled weights and a bias: the network computes the same function with one full pass over every
activation map fewer (53 of them in a ResNet-50).  The arithmetic is PyTorch's own
(``torch.nn.utils.fusion.fuse_conv_bn_weights``); this module only finds the pairs.

Pairs are found on the module's FX graph, so a convolution whose output is also used elsewhere is
never folded; modules FX cannot trace (detection heads with Python loops over levels) are searched
through their children, and inside ``nn.Sequential`` a convolution directly followed by a norm is a
pair by construction.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBN

try:  # timm has its own frozen norm (``freeze_batch_norm_2d``)
    from timm.layers import FrozenBatchNorm2d as TimmFrozenBN

    _FROZEN_NORMS: tuple[type, ...] = (TorchvisionFrozenBN, TimmFrozenBN)
except ImportError:  # pragma: no cover - timm is a dependency
    _FROZEN_NORMS = (TorchvisionFrozenBN,)


def _is_plain_norm(module: nn.Module) -> bool:
    """A norm that is nothing but the affine map (subclasses may add an activation: left alone)."""
    if type(module) in _FROZEN_NORMS:
        return True
    return type(module) is nn.BatchNorm2d and not module.training and module.track_running_stats


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and _is_plain_norm(norm)
        and conv.out_channels == norm.running_mean.numel()
    )


def _fold_pair(conv: nn.Conv2d, norm: nn.Module) -> None:
    """Rewrites ``conv`` in place so that it computes ``norm(conv(x))``."""
    weight, bias = fuse_conv_bn_weights(
        conv.weight.detach(),
        None if conv.bias is None else conv.bias.detach(),
        norm.running_mean,
        norm.running_var,
        float(norm.eps),
        norm.weight.detach() if norm.weight is not None else None,
        norm.bias.detach() if norm.bias is not None else None,
    )
    conv.weight = nn.Parameter(weight.detach(), requires_grad=False)
    conv.bias = nn.Parameter(bias.detach(), requires_grad=False)


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


class _NormsAsLeaves(fx.Tracer):
    """FX keeps ``torch.nn`` modules whole; the frozen norms of torchvision and timm must be too."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _FROZEN_NORMS) or super().is_leaf_module(m, module_qualified_name)


def _structure_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that shares its parameters and buffers: tracing reads only the module
    tree, and copying a ResNet-50's weights for each traced part cost more than the trace."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def _pairs_from_graph(module: nn.Module) -> list[tuple[str, str]] | None:
    """(conv path, norm path) pairs where the norm is the only user of the convolution's output."""
    try:
        # a copy is traced: some modules set themselves up on their first call (torchvision's
        # MultiScaleRoIAlign keeps its scales), and must not keep what they saw of a trace
        graph = _NormsAsLeaves().trace(_structure_copy(module))
    except Exception:  # any tracing failure means: search the children instead
        return None
    modules = dict(module.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv, norm = modules.get(str(src.target)), modules.get(str(node.target))
        if conv is not None and norm is not None and _foldable(conv, norm):
            pairs.append((str(src.target), str(node.target)))
    # a module called twice cannot be folded once for both calls
    convs = [c for c, _ in pairs]
    return [(c, n) for c, n in pairs if convs.count(c) == 1]


def fold_batch_norms(module: nn.Module) -> int:
    """Folds every eval-mode batch norm that directly follows a convolution; returns how many.

    The module must be in eval mode and is changed in place: folded norms become ``nn.Identity``.
    Training it afterwards would train a different parameterisation, so this is for inference only.
    """
    if module.training:
        raise ValueError("fold_batch_norms needs a module in eval mode")
    return _fold(module)


@torch.no_grad()
def _fold(module: nn.Module) -> int:
    if not any(_is_plain_norm(m) for m in module.modules()):
        return 0
    pairs = _pairs_from_graph(module) if not isinstance(module, nn.Sequential) else None
    if pairs is not None:
        for conv_path, norm_path in pairs:
            _fold_pair(module.get_submodule(conv_path), module.get_submodule(norm_path))
            _replace(module, norm_path, nn.Identity())
        return len(pairs)
    folded = 0
    if isinstance(module, nn.Sequential):
        children = list(module.named_children())
        for (_, a), (name_b, b) in itertools.pairwise(children):
            if _foldable(a, b):
                _fold_pair(a, b)
                setattr(module, name_b, nn.Identity())
                folded += 1
    for child in module.children():
        folded += _fold(child)
    return folded
