"""The classifier (timm features -> SEModule -> pooling -> linear), its losses, and classification metrics."""

from __future__ import annotations

import json
import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup, resolve_data_config
from timm.layers import SelectAdaptivePool2d, SEModule
from timm.loss import SoftTargetCrossEntropy

from vision.config import ModelConfig
from vision.errors import VisionError
from vision.metrics.classification import (
    average_precision,
    classification_metrics,
    confusion_matrix,
    multilabel_metrics,
    write_report,
)
from vision.models import build_model
from vision.models.classifier import Classifier
from vision.models.weights import infer_arch, load_model_weights


def _classifier(num_classes: int = 3, seed: int = 0, **kw) -> Classifier:
    torch.manual_seed(seed)
    kw.setdefault("backbone", "test_resnet")
    kw.setdefault("image_size", 32)
    return build_model(ModelConfig(arch="classifier", num_classes=num_classes, **kw))


# --- the model ---------------------------------------------------------------------------------


def test_head_is_timm_se_then_pooling_then_linear_on_the_last_feature_map() -> None:
    model = _classifier(4, backbone="resnet18").eval()
    assert isinstance(model.head.se, SEModule)
    assert isinstance(model.head.pool, SelectAdaptivePool2d)
    assert model.head.fc.in_features == 512 and model.head.fc.out_features == 4
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial SE weights, so the gate matters
        for p in model.head.parameters():
            p.normal_(0, 0.5)
    images = torch.rand(2, 3, 32, 32)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (lambda c: (c["mean"], c["std"]))(
        resolve_data_config({}, model=model.backbone.body)))
    # hand-composed: a fresh timm SEModule with the same weights, average pooling, linear layer
    se = SEModule(512)
    se.load_state_dict(model.head.se.state_dict())
    with torch.no_grad():
        feats = model.backbone.body((images - mean) / std)[-1]
        assert feats.shape == (2, 512, 1, 1)
        logits = F.linear(se(feats).mean((2, 3)), model.head.fc.weight, model.head.fc.bias)
        out = model(list(images))
    expected = logits.softmax(1)
    got = torch.stack([o["scores"] for o in out])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for o, e in zip(out, expected):
        assert o["labels"].tolist() == e.argsort(descending=True)[:4].tolist()


def test_training_loss_is_torch_cross_entropy_with_label_smoothing() -> None:
    model = _classifier(3, label_smoothing=0.2).train()
    x = torch.rand(4, 3, 32, 32)
    y = torch.tensor([0, 2, 1, 2])
    torch.manual_seed(5)
    loss = model(list(x), [{"label": v} for v in y])["loss_cls"]
    with torch.no_grad():  # the same training-mode forward (no dropout), loss from torch itself
        logits = model.logits(model.batch(x))
    torch.testing.assert_close(loss.detach(), F.cross_entropy(logits, y, label_smoothing=0.2), rtol=1e-5, atol=1e-6)


def test_multi_label_mode_uses_sigmoid_and_binary_cross_entropy() -> None:
    model = _classifier(3, multi_label=True).train()
    x = torch.rand(2, 3, 32, 32)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss = model(list(x), [{"label": v} for v in y])["loss_cls"]
    with torch.no_grad():
        logits = model.logits(model.batch(x))
    torch.testing.assert_close(loss.detach(), F.binary_cross_entropy_with_logits(logits, y), rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        out = model(list(x))
        torch.testing.assert_close(torch.stack([o["scores"] for o in out]), model.logits(model.batch(x)).sigmoid())


def test_mixup_follows_timm_mixup_and_soft_target_cross_entropy() -> None:
    model = _classifier(3, mixup=0.8, cutmix=1.0, label_smoothing=0.1).train()
    x = torch.rand(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 1])
    np.random.seed(3)
    loss = model(list(x), [{"label": v} for v in y])["loss_cls"]
    np.random.seed(3)
    mixer = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=3)
    xm, ym = mixer(model.batch(x), y)
    with torch.no_grad():
        expected = SoftTargetCrossEntropy()(model.logits(xm), ym)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    # an odd batch cannot be paired: trained without mixing
    assert torch.isfinite(model(list(x[:3]), [{"label": v} for v in y[:3]])["loss_cls"])


def test_images_of_different_sizes_are_resized_to_the_input_size() -> None:
    model = _classifier(3, image_size=24).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 30, 20), torch.rand(3, 24, 24), torch.rand(3, 50, 60)])
    assert len(out) == 3 and all(o["scores"].shape == (3,) for o in out)
    assert all(abs(float(o["scores"].sum()) - 1.0) < 1e-5 for o in out)


def test_a_checkpoint_with_another_class_count_is_reheaded_with_a_notice(caplog) -> None:
    src = _classifier(3, seed=1)
    ckpt = {"model": src.state_dict(), "arch": "classifier", "class_names": ["a", "b", "c"]}
    dst = _classifier(5, seed=2)
    before = dst.head.fc.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        result = load_model_weights(dst, ckpt)
    notices = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(notices) == 1 and "\n" not in notices[0] and "head.fc" in notices[0] and "class" in notices[0]
    assert sorted(result.reheaded) == ["head.fc.bias", "head.fc.weight"]
    assert torch.equal(dst.head.fc.weight, before), "the new head keeps its fresh initialisation"
    sd = src.state_dict()
    for k, v in dst.state_dict().items():
        if not k.startswith("head.fc."):
            assert torch.equal(v, sd[k]), k


def test_a_checkpoint_of_another_architecture_is_an_error_naming_both() -> None:
    assert infer_arch(_classifier(3).state_dict()) == "classifier"
    torch.manual_seed(0)
    det = build_model(ModelConfig(arch="retinanet", backbone="test_resnet", num_classes=3, fpn_channels=16))
    with pytest.raises(VisionError, match=r"retinanet model but the config builds classifier"):
        load_model_weights(_classifier(3), {"model": det.state_dict(), "arch": "retinanet"})
    with pytest.raises(VisionError, match=r"classifier model but the config builds retinanet"):
        load_model_weights(det, {"model": _classifier(3).state_dict()})


# --- metrics -----------------------------------------------------------------------------------


def test_confusion_matrix_and_accuracies_against_hand_counts(tmp_path) -> None:
    names = ["cat", "dog", "fox"]
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    # predicted (argmax):   0  1  0  1  1  2  0  2  2  2
    scores = np.array([
        [0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1],
        [0.1, 0.2, 0.7], [0.5, 0.1, 0.4], [0.2, 0.2, 0.6], [0.0, 0.1, 0.9], [0.1, 0.3, 0.6],
    ])
    expected_cm = [[2, 1, 1], [0, 2, 0], [1, 0, 3]]
    assert confusion_matrix(labels, scores.argmax(1), 3).tolist() == expected_cm
    m = classification_metrics(labels, scores, names)
    assert m["confusion_matrix"] == {"classes": names, "matrix": expected_cm}
    assert m["top1"] == pytest.approx(7 / 10)
    assert m["top5"] == pytest.approx(1.0)  # k = 3 classes: every label is in the top 3
    assert m["per_class_accuracy"] == pytest.approx({"cat": 2 / 4, "dog": 2 / 2, "fox": 3 / 4})
    assert m["mean_class_accuracy"] == pytest.approx((0.5 + 1.0 + 0.75) / 3)
    # top-2 by hand: the true class among the two best scores
    six = np.zeros((3, 6))
    six[0, [3, 1]] = [0.5, 0.4]  # true 1: rank 2
    six[1, [0, 2, 4, 5, 1, 3]] = [0.3, 0.25, 0.2, 0.1, 0.08, 0.07]  # true 3: rank 6
    six[2, [2]] = [1.0]  # true 2: rank 1
    m6 = classification_metrics(np.array([1, 3, 2]), six, list("abcdef"))
    assert m6["top1"] == pytest.approx(1 / 3) and m6["top5"] == pytest.approx(2 / 3)

    written = write_report(m, tmp_path)
    assert json.loads((tmp_path / "confusion_matrix.json").read_text())["matrix"] == expected_cm
    assert json.loads((tmp_path / "metrics.json").read_text())["top1"] == pytest.approx(0.7)
    png = cv2.imread(str(tmp_path / "confusion_matrix.png"))
    assert png is not None and png.shape[0] > 3 * 64 and png.shape[1] > 3 * 64
    assert len(written) == 3


def test_average_precision_against_hand_computed_values() -> None:
    # ranks by score: +, -, +, -, + : precision at the positives 1, 2/3, 3/5 -> AP = (1 + 2/3 + 3/5) / 3
    t = np.array([1, 0, 1, 0, 1])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    assert average_precision(t, s) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # a tie between a positive and a negative at the top: one threshold with precision 1/2
    assert average_precision(np.array([1, 0, 1]), np.array([0.9, 0.9, 0.1])) == pytest.approx(
        0.5 * 0.5 + 0.5 * (2 / 3)
    )
    targets = np.stack([t, 1 - t], 1)
    m = multilabel_metrics(targets, np.stack([s, s], 1), ["x", "y"])
    # class y: ranks -, +, -, +, - : precision 1/2, 2/4 -> AP 1/2
    assert m["per_class_AP"] == pytest.approx({"x": (1 + 2 / 3 + 3 / 5) / 3, "y": 0.5})
    assert m["mAP"] == pytest.approx(((1 + 2 / 3 + 3 / 5) / 3 + 0.5) / 2)
