"""Convolutions that apply the ReLU after them, and a residual block's addition before it, themselves.

With batch norms folded, a ResNet block is convolution, ReLU, convolution, ReLU, convolution,
addition, ReLU, and a detection head's tower is convolution, ReLU four times.  Each ReLU and each
addition is one more full pass over an activation map that has already left the cache: at 800 px a
ResNet-50 bottleneck's output in layer 1 is 64 MB, read and written twice more after the
convolution wrote it.  oneDNN applies both inside the convolution as post-ops (the kernels that
inductor's CPU fusion calls, ``torch.ops.mkldnn._convolution_pointwise``), while the output is still
in registers; Winograd convolutions apply them to each strip while it is in cache.

The values are the same: the convolution's output rounded once, plus the residual rounded once, then
clamped at zero, as the separate operations compute it.

``fuse_activations`` rewrites a model in place (classes change, parameters and the state_dict do
not), for inference only.  The fused kernel runs for float32 ``channels_last`` inputs on a CPU outside
autocast, autograd and ``torch.compile`` (inductor fuses by itself); elsewhere the convolution runs as
before and the addition and ReLU follow it.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from timm.layers import DropPath
    from timm.models._features import FeatureDictNet
    from timm.models.resnet import BasicBlock, Bottleneck
except ImportError:  # pragma: no cover - timm is a dependency
    FeatureDictNet = BasicBlock = Bottleneck = DropPath = None  # type: ignore[assignment,misc]

# builds without oneDNN, or whose oneDNN lacks the fused kernels, run the separate operations
_MKLDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class FusedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` followed by ``+ residual`` (when given) and, where ``relu``, a ReLU."""

    relu: bool = False  # set per instance by fuse_activations

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if _fusable(self, x, residual):
            padding, stride, dilation = list(self.padding), list(self.stride), list(self.dilation)
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, self.weight, self.bias, padding, stride, dilation, self.groups,
                    "relu" if self.relu else "none", [], "")
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, self.weight, self.bias, padding, stride, dilation, self.groups,
                "add", None, "relu" if self.relu else None, [], "")
        return self.finish(super().forward(x), residual)

    def finish(self, y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """What the fused kernel adds to a convolution's output ``y`` (a fresh tensor, changed in place)."""
        if residual is not None:
            y = y.add_(residual)
        return y.relu_() if self.relu else y


def _fusable(conv: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    return (_MKLDNN and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and conv.weight.dtype == torch.float32 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
            and x.is_contiguous(memory_format=torch.channels_last)
            and (residual is None or (residual.dtype == torch.float32
                                      and residual.is_contiguous(memory_format=torch.channels_last)))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad)))


def _convertible(conv: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` (or one already fused) without hooks: a subclass may compute otherwise."""
    return ((type(conv) is nn.Conv2d or isinstance(conv, FusedConv2d))
            and not conv._forward_hooks and not conv._forward_pre_hooks)


def _fuse(conv: nn.Module, relu: bool) -> FusedConv2d | None:
    """``conv`` as a ``FusedConv2d`` (its class changed in place), or None if it is not ``_convertible``."""
    if not _convertible(conv):
        return None
    if type(conv) is nn.Conv2d:
        conv.__class__ = FusedConv2d
    conv.relu = conv.relu or relu
    return conv


def _is_relu(module: nn.Module | None) -> bool:
    return type(module) is nn.ReLU and not module._forward_hooks and not module._forward_pre_hooks


def _passes_through(module: nn.Module | None) -> bool:
    """Does nothing at inference: an identity (a folded batch norm) or an eval-mode dropout."""
    if module is None or type(module) is nn.Identity:
        return True
    return DropPath is not None and isinstance(module, DropPath | nn.Dropout) and not module.training


def _in_order(container: nn.Module) -> tuple[list[tuple[str, nn.Module]], set[str]] | None:
    """The children of a container whose forward applies them one after another, and the names of
    those whose output is also returned (a feature map: fusing after it would change it); else None."""
    if isinstance(container, nn.Sequential) and type(container).forward is nn.Sequential.forward:
        return list(container.named_children()), set()
    if FeatureDictNet is not None and isinstance(container, FeatureDictNet):
        return list(container.named_children()), set(container.return_layers)
    return None


def _fuse_chains(container: nn.Module) -> int:
    """Convolution, identities, ReLU among ``container``'s children: the ReLU moves into the convolution."""
    found = _in_order(container)
    if found is None:
        return 0
    children, returned = found
    fused = 0
    pending: nn.Module | None = None  # a convolution followed so far only by identities
    for name, child in children:
        if name in returned:
            pending = None
        elif _is_relu(child) and pending is not None and _fuse(pending, relu=True) is not None:
            setattr(container, name, nn.Identity())
            fused += 1
            pending = None
        elif isinstance(child, nn.Conv2d):
            pending = child
        elif not _passes_through(child):
            pending = None
    return fused


class FusedBottleneck(Bottleneck if Bottleneck is not None else nn.Module):  # type: ignore[misc]
    """timm's ResNet bottleneck with its ReLUs and its residual addition inside the convolutions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.aa(self.conv2(self.conv1(x))), shortcut)


class FusedBasicBlock(BasicBlock if BasicBlock is not None else nn.Module):  # type: ignore[misc]
    """timm's ResNet basic block with its ReLUs and its residual addition inside the convolutions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.conv2(self.aa(self.conv1(x)), shortcut)


def _fuse_block(block: nn.Module) -> bool:
    """A timm ResNet block whose norms are folded, with plain ReLUs and nothing else between its
    convolutions, as a ``FusedBottleneck`` / ``FusedBasicBlock``."""
    if Bottleneck is None or block._forward_hooks or block._forward_pre_hooks:
        return False
    if type(block) is Bottleneck:
        stages = [("conv1", ("bn1",), "act1"), ("conv2", ("bn2", "drop_block"), "act2"), ("conv3", ("bn3",), "act3")]
        fused_class: type = FusedBottleneck
    elif type(block) is BasicBlock:
        stages = [("conv1", ("bn1", "drop_block"), "act1"), ("conv2", ("bn2",), "act2")]
        fused_class = FusedBasicBlock
    else:
        return False
    convs = [getattr(block, conv) for conv, _, _ in stages]
    between = [getattr(block, name, None) for _, names, _ in stages for name in names]
    if (block.se is not None or not _passes_through(block.drop_path)
            or not all(_convertible(c) for c in convs)
            or not all(_passes_through(m) for m in between)
            or not all(_is_relu(getattr(block, act)) for _, _, act in stages)):
        return False
    for conv, _, act in stages:
        _fuse(getattr(block, conv), relu=True)
        setattr(block, act, nn.Identity())
    block.__class__ = fused_class
    return True


def fuse_activations(model: nn.Module) -> int:
    """Move every ReLU that directly follows a convolution, and every timm ResNet block's residual
    addition, into the convolution; returns how many ReLUs moved."""
    fused = 0
    for module in list(model.modules()):
        if _fuse_block(module):
            fused += 3 if isinstance(module, FusedBottleneck) else 2
        else:
            fused += _fuse_chains(module)
    return fused
