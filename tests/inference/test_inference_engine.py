"""The inference engine computes what the model as trained computes (within 1e-3), only faster."""

from __future__ import annotations

import copy
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from torch import nn

from vision.config import ModelConfig
from vision.data.records import Categories
from vision.errors import ConfigError
from vision.inference.engine import EngineOptions, aspect_groups
from vision.inference.fold_bn import fold_batch_norms
from vision.inference.predictor import Predictor
from vision.models import build_model
from vision.runtime.precision import cpu_has_native_bf16, precision_dtype


def _with_running_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with statistics far from (0, 1), as a trained network has, so folding is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_var", None) is not None:
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model.eval()


def _images(sizes=((150, 200), (200, 150), (160, 170))) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = []
    for h, w in sizes:
        low = torch.rand(3, h // 10, w // 10, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        out.append((img * 255).to(torch.uint8))
    return out


def _detector(arch: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, backbone="resnet18", num_classes=3, fpn_channels=64, min_size=[160], max_size=224,
                      score_thresh=0.05, **kw)
    model = _with_running_stats(build_model(cfg))
    with torch.no_grad():  # scores spread out, so that the comparison covers real detections
        if arch == "retinanet":
            for conv in model.head.classification_head.modules():
                if isinstance(conv, nn.Conv2d):
                    nn.init.kaiming_normal_(conv.weight)
        else:
            model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.05)
            model.roi_heads.box_predictor.cls_score.bias.normal_(0, 0.5)
    return model


def _norms(model: nn.Module) -> int:
    return sum("BatchNorm" in type(m).__name__ for m in model.modules())


def test_folding_keeps_the_backbone_function_and_removes_every_norm() -> None:
    model = _detector("faster_rcnn", frozen_bn=True, fpn_norm="bn")
    folded = copy.deepcopy(model)
    n = fold_batch_norms(folded)
    # resnet18: 20 norms in the body (frozen ones); the FPN's 8 convolutions each have a BatchNorm2d
    assert n == 20 + 8
    assert _norms(folded) == 0
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        a, b = model.backbone(x), folded.backbone(x)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4 * float(a[k].abs().max()), rtol=0)


def test_a_convolution_used_twice_is_not_folded() -> None:
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # folding would change the second use

    m = _with_running_stats(Branching())
    expected = m(torch.ones(1, 3, 8, 8))
    assert fold_batch_norms(m) == 0
    torch.testing.assert_close(m(torch.ones(1, 3, 8, 8)), expected)


def test_norms_with_an_activation_inside_are_left_alone() -> None:
    from timm.layers import BatchNormAct2d

    m = _with_running_stats(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4)))
    assert fold_batch_norms(m) == 0


def test_training_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train())


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn", "mask_rcnn"])
def test_engine_predictions_match_the_plain_model(arch: str) -> None:
    model = _detector(arch, frozen_bn=True)
    cats = Categories.from_names(["a", "b", "c"])
    images = _images()
    plain = Predictor(model, cats, device="cpu", engine=EngineOptions.plain()).predict(images)
    fast_predictor = Predictor(model, cats, device="cpu", engine=EngineOptions())
    fast = fast_predictor.predict(images)
    assert _norms(fast_predictor.model) == 0
    assert _norms(model) == 20, "the caller's model is left as it was"
    handed_over = copy.deepcopy(model)
    owner = Predictor(handed_over, cats, device="cpu", engine=EngineOptions(), copy_model=False)
    assert owner.model is handed_over and _norms(handed_over) == 0, "rewritten in place, not held twice"
    for exp, got, own in zip(plain, fast, owner.predict(images)):
        assert len(exp["boxes"]) >= 5, "the comparison needs real detections"
        assert abs(len(got["boxes"]) - len(exp["boxes"])) <= 2
        _assert_same_detections(got, exp, top=20)
        torch.testing.assert_close(own, got)


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_compiled_engine_matches_the_plain_model(arch: str, tmp_path, monkeypatch) -> None:
    """``--compile``: backbone and dense heads compiled ahead of time (weights frozen on a CPU), Winograd
    convolutions as one operator; one package per part serves every image size, and a later predictor
    (a later process) loads the packages from the cache folder without compiling; the same detections
    within 1e-3."""
    from vision.inference import aot
    from vision.inference.winograd import WinogradConv2d

    monkeypatch.setenv("VISION_COMPILE_CACHE", str(tmp_path / "compiled"))
    compiles = []
    compile_part = aot.CompiledPart._compile
    monkeypatch.setattr(aot.CompiledPart, "_compile",
                        lambda self, *a: (compiles.append(type(self.part).__name__), compile_part(self, *a)))
    model = _detector(arch, frozen_bn=True)
    cats = Categories.from_names(["a", "b", "c"])
    images = _images(((150, 200), (200, 150), (170, 230)))
    plain = Predictor(model, cats, device="cpu", engine=EngineOptions.plain()).predict(images)

    def compiled_predictor() -> Predictor:
        predictor = Predictor(model, cats, device="cpu", engine=EngineOptions(compile=True))
        parts = [predictor.model.backbone, predictor.model.head if arch == "retinanet" else predictor.model.rpn.head]
        assert all(isinstance(m, aot.CompiledPart) for m in parts)
        assert any(isinstance(m, WinogradConv2d) for m in predictor.model.modules())
        return predictor

    fast = compiled_predictor().predict(images)
    assert len(compiles) == 2 and len(list((tmp_path / "compiled").glob("*.pt2"))) == 2  # both parts, once
    for exp, got in zip(plain, fast):
        assert len(exp["boxes"]) >= 5, "the comparison needs real detections"
        _assert_same_detections(got, exp, top=20)
    again = compiled_predictor().predict(images)
    assert len(compiles) == 2  # loaded, not compiled again
    for exp, got in zip(fast, again):
        torch.testing.assert_close(got["boxes"], exp["boxes"])
        torch.testing.assert_close(got["scores"], exp["scores"])


def _assert_same_detections(got: dict, exp: dict, top: int) -> None:
    """Every one of ``got``'s top detections is in ``exp``: same label, score within 1e-3, box within 1e-3
    of the image size.  Matched by content, since near-tied scores may come out in either order."""
    for k in range(min(top, len(got["scores"]))):
        close = (
            ((exp["boxes"] - got["boxes"][k]).abs().amax(dim=1) <= 1e-3 * 224)
            & ((exp["scores"] - got["scores"][k]).abs() <= 1e-3)
            & (exp["labels"] == got["labels"][k])
        )
        assert bool(close.any()), f"detection {k} ({got['boxes'][k].tolist()}, {float(got['scores'][k]):.4f}) not found"
        if "masks" in exp:
            j = int(close.nonzero()[0])
            torch.testing.assert_close(got["masks"][k], exp["masks"][j], atol=1e-3, rtol=0)


def test_training_time_evaluation_runs_through_the_engine(monkeypatch) -> None:
    """The trainer's evaluation (``predict_shards``) folds a copy: same detections, model left trainable."""
    from vision.inference import dataset
    from vision.inference.dataset import predict_shards

    optimized = []
    real = dataset.optimize_for_inference
    monkeypatch.setattr(dataset, "optimize_for_inference", lambda m, o: optimized.append(o) or real(m, o))

    model = _detector("faster_rcnn").train()  # evaluated in the middle of training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = [(img.float() / 255, {"image_id": i}) for i, img in enumerate(_images())]

    def collate(batch):
        return [b[0] for b in batch], [b[1] for b in batch]

    def keep(images, targets, outputs, indices):
        return dict(zip(indices, outputs))

    # one image per pass in both (padding a batch to its largest image moves detections near the edges)
    kw = dict(batch_size=2, num_workers=0, show_progress=False, split_batches=True)
    fast = predict_shards(model, dataset, torch.device("cpu"), collate, keep, **kw)
    assert optimized == [EngineOptions()]
    plain = predict_shards(model, dataset, torch.device("cpu"), collate, keep, engine=EngineOptions.plain(), **kw)
    assert len(optimized) == 1, "the plain options evaluate the model itself"
    assert model.training and _norms(model) == 20
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert sorted(fast) == sorted(plain) == [0, 1, 2]
    for i in plain:
        assert len(plain[i]["boxes"]) >= 5, "the comparison needs real detections"
        _assert_same_detections(fast[i], plain[i], top=20)


def test_classifier_engine_matches_the_plain_model() -> None:
    torch.manual_seed(0)
    model = _with_running_stats(build_model(ModelConfig(arch="classifier", backbone="resnet18", num_classes=4,
                                                         image_size=64)))
    cats = Categories.from_names(["a", "b", "c", "d"])
    images = _images(((64, 64), (80, 60)))
    plain = Predictor(model, cats, device="cpu", engine=EngineOptions.plain()).predict(images)
    fast = Predictor(model, cats, device="cpu").predict(images)
    for exp, got in zip(plain, fast):
        torch.testing.assert_close(got["scores"], exp["scores"], atol=1e-3, rtol=0)


def test_grouped_batches_come_back_in_input_order() -> None:
    model = _detector("retinanet")
    a, b = _images(((150, 200), (150, 200)))
    b = b.flip(-1)
    out = Predictor(model, Categories.from_names(["a", "b", "c"]), device="cpu",
                    engine=EngineOptions(micro_batch=2)).predict([a, b, a])
    torch.testing.assert_close(out[2]["scores"], out[0]["scores"])
    assert out[0]["scores"].shape != out[1]["scores"].shape or not torch.allclose(out[0]["scores"], out[1]["scores"])


def test_aspect_groups_put_similar_shapes_together() -> None:
    imgs = [torch.zeros(3, h, w) for h, w in [(100, 200), (200, 100), (100, 210), (210, 100), (100, 100)]]
    assert aspect_groups(imgs, 2) == [[3, 1], [4, 0], [2]]
    assert sorted(i for g in aspect_groups(imgs, 1) for i in g) == [0, 1, 2, 3, 4]


def test_images_per_pass_defaults_to_one_on_cpu() -> None:
    assert EngineOptions().images_per_pass(torch.device("cpu")) == 1
    assert EngineOptions(micro_batch=4).images_per_pass(torch.device("cpu")) == 4


def test_precision_choices_are_checked_up_front() -> None:
    cpu = torch.device("cpu")
    assert precision_dtype("fp32", cpu) is None
    with pytest.raises(ConfigError, match="fp16 is for CUDA"):
        precision_dtype("fp16", cpu)
    with pytest.raises(ConfigError, match="expected one of"):
        precision_dtype("int8", cpu)
    if cpu_has_native_bf16():
        assert precision_dtype("bf16", cpu) is torch.bfloat16
    else:
        with pytest.raises(ConfigError, match="no native bfloat16"):
            precision_dtype("bf16", cpu)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
def test_bf16_engine_keeps_the_top_detections() -> None:
    model = _detector("retinanet", frozen_bn=True)
    cats = Categories.from_names(["a", "b", "c"])
    images = _images()[:1]
    plain = Predictor(model, cats, device="cpu", engine=EngineOptions.plain()).predict(images)[0]
    half = Predictor(model, cats, device="cpu", engine=EngineOptions(precision="bf16")).predict(images)[0]
    assert half["boxes"].dtype == torch.float32
    # bfloat16 keeps 8 bits of mantissa: scores agree to about 1e-2, not 1e-3
    torch.testing.assert_close(half["scores"][:5], plain["scores"][:5], atol=3e-2, rtol=0)


def test_batched_retinanet_postprocess_equals_torchvisions() -> None:
    """One pass over the batch gives torchvision's per-image, per-level detections (top-k, clipping,
    class-wise NMS and the per-image cap all exercised)."""
    from torchvision.models.detection import RetinaNet

    from vision.inference.postprocess import batched_postprocess_detections

    model = _detector("retinanet")
    model.detections_per_img = 150
    g = torch.Generator().manual_seed(5)
    n, k, shapes = 3, 20, [(150, 200), (200, 150), (160, 170)]
    levels = [900, 225, 64]
    logits = [torch.randn(n, a, k, generator=g) * 2 - 3 for a in levels]
    regression = [torch.randn(n, a, 4, generator=g) * 0.3 for a in levels]
    anchors = []
    for _ in range(n):
        per_level = []
        for a in levels:
            xy = torch.rand(a, 2, generator=g) * 200
            wh = torch.rand(a, 2, generator=g) * 60 + 4
            per_level.append(torch.cat([xy, xy + wh], dim=1))
        anchors.append(per_level)
    heads = {"cls_logits": logits, "bbox_regression": regression}
    ref = RetinaNet.postprocess_detections(model, heads, anchors, shapes)
    got = batched_postprocess_detections(model, heads, anchors, shapes)
    for r, o in zip(ref, got):
        assert len(r["scores"]) > 50, "the comparison needs many detections"
        assert len(o["scores"]) == len(r["scores"])
        torch.testing.assert_close(o["scores"], r["scores"], rtol=0, atol=0)
        torch.testing.assert_close(o["boxes"], r["boxes"], rtol=0, atol=0)
        assert torch.equal(o["labels"], r["labels"])
    assert any(len(r["scores"]) == model.detections_per_img for r in ref), "the per-image cap is reached"
    # nothing above the threshold: empty detections for every image
    cold = {"cls_logits": [torch.full_like(x, -20.0) for x in logits], "bbox_regression": regression}
    assert [len(d["boxes"]) for d in batched_postprocess_detections(model, cold, anchors, shapes)] == [0, 0, 0]


def test_batched_roi_postprocess_equals_torchvisions() -> None:
    """The R-CNN box head's batched post-processing: torchvision's detections image by image."""
    from torchvision.models.detection.roi_heads import RoIHeads

    from vision.inference.postprocess import batched_roi_postprocess_detections

    heads = _detector("faster_rcnn").roi_heads
    heads.detections_per_img = 40
    g = torch.Generator().manual_seed(6)
    k, shapes, counts = 4, [(150, 200), (200, 150), (160, 170)], [300, 0, 250]  # one image with no proposals
    proposals = []
    for c in counts:
        xy = torch.rand(c, 2, generator=g) * 180
        proposals.append(torch.cat([xy, xy + torch.rand(c, 2, generator=g) * 50 + 1], dim=1))
    logits = torch.randn(sum(counts), k, generator=g) * 2
    regression = torch.randn(sum(counts), k * 4, generator=g) * 0.5
    ref = RoIHeads.postprocess_detections(heads, logits, regression, proposals, shapes)
    got = batched_roi_postprocess_detections(heads, logits, regression, proposals, shapes)
    for field, r_list, o_list in zip(("boxes", "scores", "labels"), ref, got):
        for r, o in zip(r_list, o_list):
            torch.testing.assert_close(o, r, rtol=0, atol=0, msg=field)
    assert [len(s) for s in ref[1]] == [40, 0, 40], "the cap and the empty image are exercised"


def test_batched_proposal_filter_equals_torchvisions() -> None:
    """The RPN's batched proposal filter: torchvision's proposals and scores image by image."""
    from torchvision.models.detection.rpn import RegionProposalNetwork

    from vision.inference.postprocess import batched_filter_proposals

    rpn = _detector("faster_rcnn").rpn.eval()
    rpn._post_nms_top_n = dict(rpn._post_nms_top_n, testing=120)
    g = torch.Generator().manual_seed(7)
    levels, shapes = [1200, 300, 80], [(150, 200), (200, 150), (160, 170)]
    n = len(shapes)
    xy = torch.rand(n, sum(levels), 2, generator=g) * 210 - 10
    proposals = torch.cat([xy, xy + torch.rand(n, sum(levels), 2, generator=g) * 60], dim=2)
    proposals[0, :50, 2:] = proposals[0, :50, :2] + 1e-4  # tiny boxes, removed
    objectness = torch.randn(n * sum(levels), 1, generator=g)
    ref = RegionProposalNetwork.filter_proposals(rpn, proposals, objectness, shapes, levels)
    got = batched_filter_proposals(rpn, proposals, objectness, shapes, levels)
    for r_list, o_list in zip(ref, got):
        for r, o in zip(r_list, o_list):
            torch.testing.assert_close(o, r, rtol=0, atol=0)
    assert [len(b) for b in ref[0]] == [120] * n, "the post-NMS cap is exercised"


def test_paste_masks_equals_torchvisions() -> None:
    """Same pasted probabilities as torchvision's ``paste_masks_in_image``, for detections as the box
    head gives them (clipped to the image; the paste's padding then reaches across the border),
    degenerate and fractional ones included."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    from torchvision.ops import clip_boxes_to_image

    from vision.inference.postprocess import paste_masks

    g = torch.Generator().manual_seed(11)
    h, w = 90, 120
    xy = torch.rand(40, 2, generator=g) * 140 - 10
    boxes = torch.cat([xy, xy + torch.rand(40, 2, generator=g) * 50], dim=1)
    boxes[0] = torch.tensor([-30.0, -20.0, 150.0, 100.0])  # the whole image
    boxes[1] = torch.tensor([40.0, 30.0, 40.0, 30.0])  # zero area
    boxes[2] = torch.tensor([-5.5, 80.25, 20.75, 89.9])  # along two borders
    boxes = clip_boxes_to_image(boxes, (h, w))
    masks = torch.rand(40, 1, 28, 28, generator=g)
    ref = paste_masks_in_image(masks, boxes, (h, w))
    got = paste_masks(masks, boxes, (h, w))
    assert got.shape == ref.shape == (40, 1, h, w)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert paste_masks(masks[:0], boxes[:0], (h, w)).shape == (0, 1, h, w)
    # torchvision fails on a box wholly outside the image (never given by the box head); here it is empty
    outside = paste_masks(masks[:1], torch.tensor([[130.0, 95.0, 160.0, 120.0]]), (h, w))
    assert outside.shape == (1, 1, h, w) and not outside.any()


def test_engine_pastes_mask_rcnn_masks_as_torchvision() -> None:
    """The engine's Mask R-CNN pastes with ``paste_masks`` and gives the plain model's masks (with the
    plain arithmetic: no folding, NCHW, direct convolutions)."""
    from vision.inference.engine import optimize_for_inference
    from vision.inference.postprocess import postprocess_with_paste_masks

    model = _detector("mask_rcnn")
    fast = optimize_for_inference(model, EngineOptions(fold_bn=False, channels_last=False, winograd=False))
    assert fast.transform.postprocess.__func__ is postprocess_with_paste_masks
    images = [img.float() / 255 for img in _images()]
    with torch.inference_mode():
        ref, got = model(images), fast(images)
    assert sum(len(r["masks"]) for r in ref) > 0
    for r, o in zip(ref, got):
        torch.testing.assert_close(o["masks"], r["masks"], rtol=0, atol=1e-5)
