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

from tests.helpers import CONFIGS
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


def _coco_v1_mask_rcnn(min_size: int, max_size: int) -> torch.nn.Module:
    """torchvision's ``maskrcnn_resnet50_fpn(weights="COCO_V1")`` without the download: the same
    construction (frozen batch norms, three trainable stages, 91 classes, ``overwrite_eps(model, 0.0)``),
    with seeded random weights.  The batch norms get trained-network statistics, some variances small
    enough (1e-4) that the eps the norms run with shows in the scores."""
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.detection.mask_rcnn import MaskRCNN_ResNet50_FPN_Weights
    from torchvision.models.detection.retinanet import overwrite_eps
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    body = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
    num_classes = len(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
    model = MaskRCNN(body, num_classes=num_classes, min_size=min_size, max_size=max_size, **RCNN_KWARGS)
    overwrite_eps(model, 0.0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                var = 10 ** (torch.rand(m.running_var.shape, generator=g) * 4 - 4)  # 1e-4 .. 1
                m.running_var.copy_(var)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * var.sqrt() * 0.1)
                m.weight.copy_(var.sqrt() * (torch.rand(m.weight.shape, generator=g) + 0.5))
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.02)
        model.roi_heads.box_predictor.cls_score.bias.normal_(0, 0.5)
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.normal_(0, 0.1)
    return model.eval()


def test_coco_mask_rcnn_config_runs_torchvisions_coco_weights(tmp_path) -> None:
    """``configs/mask_rcnn_r50_fpn.yaml`` with a torchvision COCO Mask R-CNN state_dict, loaded as
    ``vision predict --weights model.pth --config ...`` loads it, and run by the inference engine (batched
    post-processing and mask paste; no folding, NCHW, direct convolutions, so the arithmetic is
    torchvision's): torchvision's detections, masks equal, and torchvision's COCO category names by label.

    Any other rounding (folding, channels_last or Winograd alike) moves this small two-stage model's
    boxes by about 0.01 px: proposals shift, and RoIAlign samples elsewhere."""

    from torchvision.models.detection.mask_rcnn import MaskRCNN_ResNet50_FPN_Weights

    from vision.inference.engine import EngineOptions
    from vision.inference.loading import load_model_for_inference
    from vision.inference.predictor import Predictor
    from vision.models.backbone import set_batch_norm_eps

    size = 160
    ref = _coco_v1_mask_rcnn(size, size)
    weights = tmp_path / "maskrcnn_resnet50_fpn_coco.pth"
    torch.save(ref.state_dict(), weights)
    config = CONFIGS / "mask_rcnn_r50_fpn.yaml"
    kwargs = ",".join(f"{k}: {v}" for k, v in RCNN_KWARGS.items())
    model, cfg, categories = load_model_for_inference(
        weights, config, [f"model.min_size=[{size}]", f"model.max_size={size}", f"model.kwargs={{{kwargs}}}"]
    )
    assert (cfg.model.num_classes, cfg.model.bn_eps, cfg.model.frozen_bn) == (90, 0.0, True)
    names = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]
    # torchvision's names by label; its "N/A" slots carry their COCO id, so every name is distinct
    assert [categories.name_of(k) for k in range(1, 91)] == [f"N/A {k}" if n == "N/A" else n for k, n in enumerate(names) if k]
    assert [categories.id_of(k) for k in range(1, 91)] == list(range(1, 91))  # label k is COCO id k

    image = (_images()[1][:, :150, :200] * 255).to(torch.uint8)
    predictor = Predictor(model, categories, device="cpu", engine=EngineOptions(fold_bn=False, channels_last=False, winograd=False))
    with torch.no_grad():
        exp = ref([image.float() / 255])[0]
    got = predictor.predict([image])[0]
    assert len(exp["boxes"]) >= 20, "the reference must produce real detections to compare"
    assert (exp["masks"] > 0.5).flatten(1).any(1).sum() >= 10, "and real masks"
    assert got["boxes"].shape == exp["boxes"].shape
    assert torch.equal(got["labels"], exp["labels"])
    torch.testing.assert_close(got["boxes"], exp["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(got["scores"], exp["scores"], atol=1e-3, rtol=0)
    assert torch.equal(got["masks"] > 0.5, exp["masks"] > 0.5)
    torch.testing.assert_close(got["masks"], exp["masks"], atol=1e-5, rtol=0)

    # the config's bn_eps is what makes them agree: with timm's default the backbone computes another function
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        body = model.backbone.body
        features = body(x)[-1]
        set_batch_norm_eps(body, 1e-5)
        shifted = body(x)[-1]
    assert (shifted - features).abs().max() > 1e-2 * features.abs().max()
