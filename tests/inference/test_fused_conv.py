"""ReLUs and residual additions moved into convolutions, against the separate PyTorch operations."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from vision.inference.engine import EngineOptions, optimize_for_inference
from vision.inference.fold_bn import fold_batch_norms
from vision.inference.fused_conv import FusedBasicBlock, FusedBottleneck, FusedConv2d, fuse_activations
from vision.inference.winograd import WinogradConv2d, use_winograd

CL = torch.channels_last


def _conv(c: int, k: int, size: int, stride: int = 1) -> nn.Conv2d:
    torch.manual_seed(c + k + size)
    return nn.Conv2d(c, k, size, stride=stride, padding=size // 2).to(memory_format=CL)


@pytest.mark.parametrize(("size", "stride"), [(1, 1), (3, 1), (3, 2), (7, 2)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_a_fused_convolution_computes_conv_add_relu(size: int, stride: int, with_residual: bool) -> None:
    conv = _conv(32, 48, size, stride)
    fused = copy.deepcopy(conv)
    fused.__class__ = FusedConv2d
    fused.relu = True
    x = torch.randn(2, 32, 23, 30).contiguous(memory_format=CL)
    with torch.inference_mode():
        direct = conv(x)
        residual = torch.randn_like(direct) if with_residual else None
        expected = (direct + residual if with_residual else direct).relu()
        got = fused(x, residual)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert (got >= 0).all() and bool((expected == 0).any())


def test_a_build_without_the_fused_kernel_runs_the_separate_operations(monkeypatch) -> None:
    import vision.inference.fused_conv as fused_conv

    conv = _conv(16, 24, 3)
    fused = copy.deepcopy(conv)
    fused.__class__ = FusedConv2d
    fused.relu = True
    x = torch.randn(1, 16, 12, 12).contiguous(memory_format=CL)
    residual = torch.randn(1, 24, 12, 12).contiguous(memory_format=CL)
    monkeypatch.setattr(fused_conv, "_MKLDNN", False)
    with torch.inference_mode():
        assert torch.equal(fused(x, residual), F.relu(conv(x) + residual))


def test_the_separate_operations_run_where_the_fused_kernel_does_not_apply() -> None:
    conv = _conv(16, 16, 3)
    fused = copy.deepcopy(conv)
    fused.__class__ = FusedConv2d
    fused.relu = True
    x = torch.randn(1, 16, 12, 12, requires_grad=True)  # NCHW, and autograd
    residual = torch.randn(1, 16, 12, 12)
    got = fused(x, residual)
    expected = F.relu(conv(x) + residual)
    assert torch.equal(got, expected)
    got.sum().backward()  # gradients flow as through the separate operations
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x.detach().contiguous(memory_format=CL))
    assert y.dtype == torch.bfloat16 and (y >= 0).all()


@pytest.mark.parametrize("name", ["resnet50", "resnet18"])
def test_a_timm_backbone_with_fused_blocks_gives_the_same_features(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4)).eval()
    for m in model.modules():  # batch-norm statistics as a trained network has them
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    fold_batch_norms(model)
    model = model.to(memory_format=CL)
    reference = copy.deepcopy(model)
    use_winograd(model)  # Winograd convolutions take the ReLU and the residual too (BasicBlock's conv2)
    use_winograd(reference)
    moved = fuse_activations(model)
    blocks = [m for m in model.modules() if isinstance(m, FusedBottleneck | FusedBasicBlock)]
    assert len(blocks) == (16 if name == "resnet50" else 8)
    assert moved == 1 + sum(3 if isinstance(b, FusedBottleneck) else 2 for b in blocks)  # the stem's too
    assert not any(type(m) is nn.ReLU for m in model.modules())
    assert any(isinstance(m, WinogradConv2d) and m.relu for m in model.modules())
    x = torch.randn(1, 3, 160, 224).contiguous(memory_format=CL)
    with torch.inference_mode():
        expected, got = reference(x), model(x)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5 * e.abs().max().item(), rtol=0)


def test_a_returned_feature_keeps_its_value() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(0, 1)).eval()
    fold_batch_norms(model)
    reference = copy.deepcopy(model)
    fuse_activations(model)
    assert type(model.act1) is nn.ReLU  # the stem's ReLU output is returned: left where it is
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        for e, g in zip(reference(x), model(x), strict=True):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


def test_blocks_with_more_than_relus_between_their_convolutions_are_left_alone() -> None:
    torch.manual_seed(0)
    unfolded = timm.create_model("resnet18", pretrained=False).eval()  # batch norms not folded
    fuse_activations(unfolded)
    assert not any(isinstance(m, FusedBasicBlock) for m in unfolded.modules())
    se = timm.create_model("seresnet18", pretrained=False).eval()  # squeeze-excitation before the addition
    fold_batch_norms(se)
    fuse_activations(se)
    assert not any(isinstance(m, FusedBasicBlock) for m in se.modules())

    class OwnConv(nn.Conv2d):  # a convolution subclass: its forward takes no residual and may differ
        pass

    other = timm.create_model("resnet18", pretrained=False).eval()
    fold_batch_norms(other)
    block = other.layer1[0]
    block.conv2.__class__ = OwnConv
    reference = copy.deepcopy(other)
    fuse_activations(other)
    assert type(other.layer1[0]) is not FusedBasicBlock and type(other.layer1[0].act2) is nn.ReLU
    assert isinstance(other.layer1[1], FusedBasicBlock)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(other(x), reference(x), atol=1e-5, rtol=1e-5)


def test_the_engine_fuses_on_a_cpu_only_where_asked() -> None:
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5).eval()
    fast = optimize_for_inference(model, EngineOptions())
    head = fast.head.classification_head.conv
    assert all(isinstance(block[0], FusedConv2d) and block[0].relu for block in head)
    plain = optimize_for_inference(model, EngineOptions(fuse_activations=False))
    assert not any(isinstance(m, FusedConv2d) and m.relu for m in plain.modules())
    x = torch.rand(1, 3, 256, 320, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=CL)
    with torch.inference_mode():
        got = fast.head(list(fast.backbone(x).values()))
        expected = plain.head(list(plain.backbone(x).values()))
    for key in ("cls_logits", "bbox_regression"):
        scale = expected[key].abs().max().item()
        torch.testing.assert_close(got[key], expected[key], atol=1e-5 * scale, rtol=0)
