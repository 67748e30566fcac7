"""Backbone + FPN on several timm families, frozen stages and batch norms, config -> torchvision args."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from vision.config import ModelConfig
from vision.errors import ConfigError
from vision.models import build_model
from vision.models.backbone import build_backbone


def _targets(n: int, size: int, with_masks: bool) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        boxes = torch.tensor([[8.0, 10.0, 60.0, 70.0], [40.0 + i, 30.0, 110.0, 100.0]])
        t = {"boxes": boxes, "labels": torch.tensor([1, 2])}
        if with_masks:
            masks = torch.zeros(2, size, size, dtype=torch.uint8)
            for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                masks[j, y0:y1, x0:x1] = 1
            t["masks"] = masks
        out.append(t)
    return out


@pytest.mark.parametrize(
    ("backbone", "arch"),
    [
        ("resnet18", "retinanet"),
        ("efficientnet_b0", "faster_rcnn"),
        ("mobilenetv3_small_100", "mask_rcnn"),
        ("convnext_atto", "retinanet"),
        ("regnetx_002", "faster_rcnn"),
        ("resnext26ts", "retinanet"),
    ],
)
def test_timm_backbones_train_step(backbone: str, arch: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch=arch, backbone=backbone, num_classes=2, fpn_channels=32, min_size=[128], max_size=128,
        kwargs={"rpn_batch_size_per_image": 32, "box_batch_size_per_image": 32} if arch != "retinanet" else {},
    )
    model = build_model(cfg).train()
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    losses = model(images, _targets(2, 128, arch == "mask_rcnn"))
    expected = {"retinanet": {"classification", "bbox_regression"}}.get(
        arch, {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    )
    if arch == "mask_rcnn":
        expected = expected | {"loss_mask"}
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    first = next(p for p in model.backbone.body.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0, "gradients must reach the backbone stem"
    model.eval()
    with torch.no_grad():
        (det,) = model([torch.rand(3, 128, 128)])
    assert set(det) >= {"boxes", "scores", "labels"}


@pytest.mark.parametrize("name", ["convnext_atto", "dla34"])
def test_pyramid_levels_and_strides(name: str) -> None:
    """RetinaNet: P3-P7 (strides 8..128); R-CNN: P2-P6 (4..64); channels = fpn_channels.

    Levels are picked by stride: ConvNeXt starts at stride 4, DLA at stride 1 with its default
    ``out_indices`` skipping that level.
    """
    x = torch.rand(1, 3, 256, 256)
    retina = build_backbone(name, fpn_channels=24, levels="retinanet")
    rcnn = build_backbone(name, fpn_channels=24, levels="rcnn")
    r = retina(x)
    c = rcnn(x)
    assert list(r) == ["0", "1", "2", "p6", "p7"]
    assert [256 // v.shape[-1] for v in r.values()] == [8, 16, 32, 64, 128]
    assert list(c) == ["0", "1", "2", "3", "pool"]
    assert [256 // v.shape[-1] for v in c.values()] == [4, 8, 16, 32, 64]
    assert retina.out_channels == 24 and all(v.shape[1] == 24 for v in [*r.values(), *c.values()])
    # P6 comes from P5 as in retinanet_resnet50_fpn (LastLevelP6P7 with equal channel counts)
    assert retina.fpn.extra_blocks.use_P5


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 2, 3, 4])
def test_frozen_stages_match_torchvision_trainable_layers(frozen_stages: int) -> None:
    """frozen_stages=k freezes what torchvision's trainable_layers=4-k freezes on a ResNet."""
    ours = build_backbone("resnet18", fpn_channels=32, frozen_stages=frozen_stages)
    ref = _resnet_fpn_extractor(torchvision.models.resnet18(), trainable_layers=min(5, 4 - frozen_stages))
    trainable = {n for n, p in ours.body.named_parameters() if p.requires_grad}
    ref_trainable = {n for n, p in ref.body.named_parameters() if p.requires_grad}
    assert trainable == ref_trainable


def _bn_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k}


def test_frozen_stages_keep_their_batch_norm_statistics() -> None:
    bb = build_backbone("resnet18", fpn_channels=32, frozen_stages=1).train()
    assert isinstance(bb.body.bn1, FrozenBatchNorm2d)
    assert isinstance(bb.body.layer1[0].bn1, FrozenBatchNorm2d)
    assert type(bb.body.layer2[0].bn1) is nn.BatchNorm2d
    before = _bn_stats(bb.body)
    bb(torch.rand(2, 3, 96, 96) * 3)
    after = _bn_stats(bb.body)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith(("bn1.", "layer1.")) for k in changed)
    assert any(k.startswith("layer2.") for k in changed)
    assert any(k.startswith("layer4.") for k in changed)


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_b0"])
def test_frozen_bn_freezes_every_batch_norm(backbone: str) -> None:
    bb = build_backbone(backbone, fpn_channels=32, frozen_bn=True).train()
    assert not [m for m in bb.body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    before = _bn_stats(bb.body)
    assert before, "the frozen norms keep their statistics as buffers"
    out = bb(torch.rand(2, 3, 96, 96) * 3)
    sum(v.sum() for v in out.values()).backward()
    after = _bn_stats(bb.body)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the convolutions still train
    assert all(p.requires_grad for p in bb.body.parameters())


def test_config_reaches_torchvision() -> None:
    cfg = ModelConfig(
        arch="faster_rcnn", backbone="resnet18", num_classes=3, fpn_channels=64,
        anchor_sizes=[[16], [32], [64], [128], [256]], aspect_ratios=[1.0, 2.0],
        min_size=[480, 512, 544], max_size=700, score_thresh=0.2, nms_thresh=0.4, detections_per_img=17,
        kwargs={"rpn_batch_size_per_image": 64},
    )
    m = build_model(cfg)
    assert m.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes + background
    assert m.backbone.out_channels == 64
    assert m.rpn.anchor_generator.sizes == ((16,), (32,), (64,), (128,), (256,))
    assert m.rpn.anchor_generator.aspect_ratios == ((1.0, 2.0),) * 5
    assert m.rpn.head.cls_logits.out_channels == 2
    assert m.transform.min_size == (480, 512, 544) and m.transform.max_size == 700
    assert (m.roi_heads.score_thresh, m.roi_heads.nms_thresh, m.roi_heads.detections_per_img) == (0.2, 0.4, 17)
    assert m.rpn.fg_bg_sampler.batch_size_per_image == 64


def test_rcnn_head_widths_reach_torchvisions_heads() -> None:
    """box_head_dim / mask_head_channels build torchvision's own head classes at those widths; unset, the
    heads are exactly the ones torchvision builds (parameter names and shapes of its COCO weights)."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    narrow = build_model(ModelConfig(arch="mask_rcnn", backbone="resnet18", num_classes=3, fpn_channels=64,
                                     box_head_dim=128, mask_head_channels=32))
    heads = narrow.roi_heads
    assert (heads.box_head.fc6.in_features, heads.box_head.fc6.out_features) == (64 * 7 * 7, 128)
    assert heads.box_predictor.cls_score.out_features == 4 and heads.box_predictor.bbox_pred.out_features == 16
    assert [layer[0].out_channels for layer in heads.mask_head] == [32] * 4
    assert heads.mask_head[0][0].in_channels == 64
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 4
    narrow.train()
    target = {"boxes": torch.tensor([[10.0, 10, 60, 70]]), "labels": torch.tensor([2]),
              "masks": torch.zeros(1, 128, 160, dtype=torch.uint8)}
    target["masks"][0, 10:70, 10:60] = 1
    losses = narrow([torch.rand(3, 128, 160)], [target])
    assert "loss_mask" in losses and all(torch.isfinite(v) for v in losses.values())

    default = build_model(ModelConfig(arch="mask_rcnn", backbone="resnet18", num_classes=3))
    ref = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    shapes = lambda m: {k: v.shape for k, v in m.roi_heads.state_dict().items()}  # noqa: E731
    assert shapes(default) == shapes(ref)
    with pytest.raises(ConfigError, match=r"mask_head_channels applies to mask_rcnn, not faster_rcnn"):
        build_model(ModelConfig(arch="faster_rcnn", backbone="resnet18", num_classes=3, mask_head_channels=32))


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn", "mask_rcnn"])
def test_defaults_are_torchvision_defaults(arch: str) -> None:
    factory = {
        "retinanet": torchvision.models.detection.retinanet_resnet50_fpn,
        "faster_rcnn": torchvision.models.detection.fasterrcnn_resnet50_fpn,
        "mask_rcnn": torchvision.models.detection.maskrcnn_resnet50_fpn,
    }[arch]
    ref = factory(weights=None, weights_backbone=None, num_classes=4)
    ours = build_model(ModelConfig(arch=arch, backbone="resnet18", num_classes=3))
    gen = "anchor_generator" if arch == "retinanet" else "rpn"
    ref_gen = ref.anchor_generator if arch == "retinanet" else ref.rpn.anchor_generator
    our_gen = ours.anchor_generator if arch == "retinanet" else ours.rpn.anchor_generator
    assert (our_gen.sizes, our_gen.aspect_ratios) == (ref_gen.sizes, ref_gen.aspect_ratios), gen
    assert (ours.transform.min_size, ours.transform.max_size) == (ref.transform.min_size, ref.transform.max_size)
    post = ours if arch == "retinanet" else ours.roi_heads
    ref_post = ref if arch == "retinanet" else ref.roi_heads
    for name in ("score_thresh", "nms_thresh", "detections_per_img"):
        assert getattr(post, name) == getattr(ref_post, name), name


def test_bad_configs_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown model.arch 'yolo'"):
        build_model(ModelConfig(arch="yolo", num_classes=3))
    with pytest.raises(ConfigError, match=r"model.num_classes is 0"):
        build_model(ModelConfig(arch="retinanet", backbone="resnet18"))
    with pytest.raises(ConfigError, match=r"anchor_sizes has 2 levels .* has 5"):
        build_model(ModelConfig(arch="retinanet", backbone="resnet18", num_classes=3, anchor_sizes=[[32], [64]]))
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnet_nope'"):
        build_model(ModelConfig(arch="retinanet", backbone="resnet_nope", num_classes=3))


def test_normalised_fpn_and_head_as_torchvision_v2() -> None:
    """head_norm=gn + box_loss=giou is torchvision's retinanet_resnet50_fpn_v2 head: same modules, same loss."""
    from torchvision.models.detection import retinanet_resnet50_fpn_v2

    cfg = ModelConfig(arch="retinanet", backbone="resnet18", num_classes=4, fpn_channels=64, min_size=[128],
                      max_size=160, fpn_norm="bn", head_norm="gn", box_loss="giou")
    model = build_model(cfg)
    ref = retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=5)
    ours_head = [type(m) for m in model.head.modules()]
    ref_head = [type(m) for m in ref.head.modules()]
    assert ours_head == ref_head and nn.GroupNorm in ours_head
    assert model.head.regression_head._loss_type == ref.head.regression_head._loss_type == "giou"
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.fpn.modules())
    model.train()
    losses = model([torch.rand(3, 128, 160)], [{"boxes": torch.tensor([[10.0, 10, 60, 70]]), "labels": torch.tensor([2])}])
    assert set(losses) == {"classification", "bbox_regression"} and all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ConfigError, match=r"model\.box_loss=iou"):
        build_model(ModelConfig(arch="retinanet", backbone="resnet18", num_classes=1, box_loss="iou"))


def test_crowded_mask_rcnn_trains_under_bfloat16_autocast() -> None:
    """Hundreds of instances under bfloat16: anchors, proposals and mask-target indices stay exact.

    In bfloat16 an instance index above 256 rounds (299 -> 300), and torchvision's mask targets
    then point past the last mask: the step fails in RoIAlign.  Anchors made in the features'
    dtype would also move in 4 px steps near 1000 px.
    """
    torch.manual_seed(0)
    size, n = 320, 300
    cfg = ModelConfig(arch="mask_rcnn", backbone="resnet18", num_classes=1, fpn_channels=32, min_size=[size],
                      max_size=size, anchor_sizes=[[8], [16], [32], [64], [128]],
                      kwargs={"rpn_batch_size_per_image": 64, "box_batch_size_per_image": 512})
    model = build_model(cfg).train()
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    boxes = []
    for k in range(n):
        y, x = divmod(k, 20)
        y0, x0 = 2 + 16 * y, 2 + 16 * x
        masks[k, y0:y0 + 10, x0:x0 + 10] = 1
        boxes.append([x0, y0, x0 + 10, y0 + 10])
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.ones(n, dtype=torch.int64),
              "masks": masks}
    seen: dict[str, torch.dtype] = {}

    def record(key: str, tensor: torch.Tensor) -> None:
        seen.setdefault(key, tensor.dtype)

    model.rpn.anchor_generator.register_forward_hook(lambda m, a, out: record("anchors", out[0]))
    model.roi_heads.register_forward_hook(lambda m, a, out: record("proposals", a[1][0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([torch.rand(3, size, size)], [target])
    assert seen == {"anchors": torch.float32, "proposals": torch.float32}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


def test_float32_hooks_widen_half_precision_only() -> None:
    """The hooks widen 16-bit results; a float64 model's features stay float64."""
    model = build_model(ModelConfig(arch="faster_rcnn", backbone="resnet18", num_classes=1, fpn_channels=16))
    model.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert {f.dtype for f in model.backbone(x).values()} == {torch.float32}
    with torch.no_grad():
        assert {f.dtype for f in model.double().backbone(x.double()).values()} == {torch.float64}


@pytest.mark.parametrize(
    ("arch", "typo", "meant"),
    [
        ("faster_rcnn", "rpn_pre_nms_top_n_trian", "rpn_pre_nms_top_n_train"),
        ("mask_rcnn", "box_batch_size_per_imag", "box_batch_size_per_image"),
        ("retinanet", "topk_candidate", "topk_candidates"),
        ("semantic_fpn", "size_divisble", "size_divisible"),
    ],
)
def test_misspelt_model_kwargs_are_refused_with_a_suggestion(arch: str, typo: str, meant: str) -> None:
    cfg = ModelConfig(arch=arch, backbone="test_resnet", num_classes=2, kwargs={typo: 7})
    with pytest.raises(ConfigError, match=rf"unknown config key 'model.kwargs.{typo}'.*did you mean 'model.kwargs.{meant}'"):
        build_model(cfg)


def test_model_kwargs_reach_every_torchvision_layer_they_name() -> None:
    """Keys of FasterRCNN's own constructor, of the parent MaskRCNN hands them to, and of the transform."""
    kwargs = {"rpn_pre_nms_top_n_train": 321, "box_batch_size_per_image": 99, "size_divisible": 16}
    m = build_model(ModelConfig(arch="mask_rcnn", backbone="test_resnet", num_classes=2, kwargs=kwargs))
    assert m.rpn._pre_nms_top_n["training"] == 321
    assert m.roi_heads.fg_bg_sampler.batch_size_per_image == 99
    assert m.transform.size_divisible == 16


@pytest.mark.parametrize(
    ("backbone", "frozen_bn", "kinds"),
    [("resnet18", False, {"FrozenBatchNorm2d", "BatchNorm2d"}), ("efficientnet_b0", True, {"FrozenBatchNormAct2d"})],
)
def test_bn_eps_reaches_every_backbone_norm(backbone: str, frozen_bn: bool, kinds: set[str]) -> None:
    """``model.bn_eps`` (torchvision's COCO_V1 weights run with 0) sets every norm of the timm network,
    frozen or not, plain or with its activation; the FPN's own norms keep theirs."""
    cfg = ModelConfig(arch="faster_rcnn", backbone=backbone, num_classes=3, fpn_channels=32, frozen_stages=1,
                      frozen_bn=frozen_bn, fpn_norm="bn", bn_eps=0.0)
    model = build_model(cfg)
    norms = [m for m in model.backbone.body.modules() if hasattr(m, "running_var")]
    assert {type(m).__name__ for m in norms} == kinds
    assert norms and all(m.eps == 0.0 for m in norms)
    fpn_norms = [m for m in model.backbone.fpn.modules() if hasattr(m, "running_var")]
    assert fpn_norms and all(m.eps == 1e-5 for m in fpn_norms)
    default = build_model(ModelConfig(arch="faster_rcnn", backbone=backbone, num_classes=3, fpn_channels=32))
    assert all(m.eps == 1e-5 for m in default.backbone.body.modules() if hasattr(m, "running_var"))
