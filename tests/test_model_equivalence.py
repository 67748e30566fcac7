"""vision's detectors on a timm resnet50 give torchvision's detections from torchvision's weights.

torchvision's own ``*_resnet50_fpn`` models are the reference: their random state_dict is loaded
into vision's model (strictly: no missing or unexpected key) and both run on the same images.
Random heads score everything near the prior, so the class-logit weights are widened first to give
well-separated scores and real detections to compare.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from torchvision.models.detection import (
    fasterrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn,
    retinanet_resnet50_fpn,
)

from vision.config import ModelConfig
from vision.models import build_model
from vision.models.weights import load_model_weights

MIN_SIZE, MAX_SIZE = 224, 288
# fewer RPN proposals keep the R-CNN box heads cheap on CPU; both models get the same value
RCNN_KWARGS = dict(rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=200, box_detections_per_img=40)


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # smooth structure rather than pure noise, so features differ across the image
    imgs = []
    for h, w in [(224, 288), (208, 256)]:
        low = torch.rand(3, h // 16, w // 16, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        imgs.append((img + 0.1 * torch.rand(3, h, w, generator=g)).clamp(0, 1))
    return imgs


def _compare(arch: str, reference: torch.nn.Module, extra: dict) -> None:
    torch.manual_seed(1)
    reference.eval()
    ours = build_model(
        ModelConfig(
            arch=arch,
            backbone="resnet50",
            num_classes=90,  # torchvision's 91 include the background
            min_size=[MIN_SIZE],
            max_size=MAX_SIZE,
            kwargs=extra,
        )
    ).eval()
    result = load_model_weights(ours, reference.state_dict(), strict=True)
    assert result.missing == [] and result.unexpected == [] and result.reheaded == []

    images = _images()
    with torch.no_grad():
        expected = reference(images)
        got = ours(images)
    for exp, out in zip(expected, got):
        assert len(exp["boxes"]) >= 20, "the reference must produce real detections to compare"
        assert exp["scores"].max() - exp["scores"].min() > 0.05, "scores must not be all alike"
        assert out["boxes"].shape == exp["boxes"].shape
        assert torch.equal(out["labels"], exp["labels"])
        torch.testing.assert_close(out["boxes"], exp["boxes"], atol=1e-3, rtol=0)
        torch.testing.assert_close(out["scores"], exp["scores"], atol=1e-4, rtol=0)
        if "masks" in exp:
            assert out["masks"].shape == exp["masks"].shape
            torch.testing.assert_close(out["masks"], exp["masks"], atol=1e-3, rtol=0)


def test_retinanet_matches_torchvision() -> None:
    torch.manual_seed(0)
    ref = retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE)
    with torch.no_grad():
        ref.head.classification_head.cls_logits.weight.normal_(0, 0.05)
    _compare("retinanet", ref, {})


def test_faster_rcnn_matches_torchvision() -> None:
    torch.manual_seed(0)
    ref = fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE, **RCNN_KWARGS
    )
    with torch.no_grad():
        ref.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.02)
        ref.roi_heads.box_predictor.cls_score.bias.normal_(0, 0.5)
        ref.roi_heads.box_predictor.bbox_pred.weight.normal_(0, 0.01)
    _compare("faster_rcnn", ref, RCNN_KWARGS)


def test_mask_rcnn_matches_torchvision() -> None:
    torch.manual_seed(0)
    ref = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=MIN_SIZE, max_size=MAX_SIZE, **RCNN_KWARGS
    )
    with torch.no_grad():
        ref.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.02)
        ref.roi_heads.box_predictor.cls_score.bias.normal_(0, 0.5)
        ref.roi_heads.mask_predictor.mask_fcn_logits.weight.normal_(0, 0.1)
    _compare("mask_rcnn", ref, RCNN_KWARGS)


@pytest.mark.parametrize(
    ("arch", "factory"),
    [
        ("retinanet", retinanet_resnet50_fpn),
        ("faster_rcnn", fasterrcnn_resnet50_fpn),
        ("mask_rcnn", maskrcnn_resnet50_fpn),
    ],
)
def test_same_keys_and_shapes_as_torchvision(arch: str, factory) -> None:
    """The published COCO layout (91 classes) maps onto vision's model key for key."""
    ref = factory(weights=None, weights_backbone=None).state_dict()
    ours = build_model(ModelConfig(arch=arch, backbone="resnet50", num_classes=90)).state_dict()
    assert set(ours) == set(ref)
    assert all(ours[k].shape == ref[k].shape for k in ref)
