"""``vision export``: the written TorchScript / ONNX model gives PyTorch's outputs (within 1e-3)."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch
from torch import nn

from vision.cli import main
from vision.config import Config, ModelConfig, config_to_dict
from vision.inference.export import _example_image, _matched_gap, detection_output_names, export_model
from vision.inference.loading import load_model_for_inference
from vision.models import build_model

NAMES = ["cell", "dot", "ring"]


def _checkpoint(path: Path, arch: str) -> str:
    """A small model whose batch norms hold non-trivial statistics and whose scores are well separated."""
    torch.manual_seed(0)
    cfg = Config()
    if arch == "classifier":
        cfg.model = ModelConfig(arch=arch, backbone="resnet18", num_classes=len(NAMES), image_size=64)
    else:
        cfg.model = ModelConfig(arch=arch, backbone="resnet18", num_classes=len(NAMES), fpn_channels=32,
                                min_size=[96], max_size=128, score_thresh=0.05, detections_per_img=30)
    model = build_model(cfg.model).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
        if arch == "retinanet":
            for conv in model.head.classification_head.modules():
                if isinstance(conv, nn.Conv2d):
                    nn.init.kaiming_normal_(conv.weight)
            model.head.classification_head.cls_logits.bias.zero_()
        elif arch != "classifier":
            model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.05)
            model.roi_heads.box_predictor.cls_score.bias.normal_(0, 0.5)
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "class_names": NAMES, "arch": arch}, path)
    return str(path)


def _separated_detections(weights: str) -> int:
    model, _, _ = load_model_for_inference(weights)
    with torch.no_grad():
        ref = model([_example_image(96, 128)])[0]
    return int((ref["scores"] > ref["scores"].min() + 1e-3).sum())


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn", "mask_rcnn"])
def test_torchscript_detector_reproduces_pytorch(tmp_path, arch) -> None:
    weights = _checkpoint(tmp_path / f"{arch}.pt", arch)
    assert _separated_detections(weights) >= 5, "the check needs detections to compare"
    result = export_model(weights, "torchscript", tmp_path / "model.torchscript.pt")
    assert result.compared >= 5 and result.max_diff is not None and result.max_diff <= 1e-3
    # any number of images of any size: scripted models keep Python's lists
    loaded = torch.jit.load(str(result.path))
    _, dets = loaded([torch.rand(3, 80, 100), torch.rand(3, 120, 90)])
    assert len(dets) == 2 and set(detection_output_names(arch)) <= set(dets[0])
    meta = json.loads(result.path.with_suffix(".json").read_text())
    assert meta["labels"]["1"]["name"] == "cell" and meta["arch"] == arch


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn", "mask_rcnn"])
def test_onnx_detector_reproduces_pytorch_in_onnxruntime(tmp_path, arch) -> None:
    ort = pytest.importorskip("onnxruntime")
    weights = _checkpoint(tmp_path / f"{arch}.pt", arch)
    result = export_model(weights, "onnx", tmp_path / "model.onnx")
    assert result.checked_with == "onnxruntime"
    assert result.compared >= 5 and result.max_diff <= 1e-3
    # another image size than the one exported with
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    image = _example_image(110, 90)
    got = dict(zip(detection_output_names(arch), session.run(None, {"image": image.numpy()})))
    model, _, _ = load_model_for_inference(weights)
    with torch.no_grad():
        ref = model([image])[0]
    gap, compared = _matched_gap({k: torch.from_numpy(v) for k, v in got.items()}, ref)
    assert compared >= 3 and gap <= 1e-3


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_classifier_export_takes_any_batch(tmp_path, fmt) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    weights = _checkpoint(tmp_path / "cls.pt", "classifier")
    result = export_model(weights, fmt, tmp_path / f"cls.{fmt}")
    assert result.compared == 2 * len(NAMES) and result.max_diff <= 1e-4


def test_matched_gap_finds_a_moved_box() -> None:
    ref = {"boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20]]), "scores": torch.tensor([0.9, 0.5]),
           "labels": torch.tensor([1, 2])}
    swapped = {k: v.flip(0) for k, v in ref.items()}
    assert _matched_gap(swapped, ref) == (0.0, 1)  # order does not matter; the lowest score is the cut-off
    moved = {**ref, "boxes": ref["boxes"] + torch.tensor([[3.0, 0, 3, 0], [0, 0, 0, 0]])}
    assert _matched_gap(moved, ref)[0] == float("inf")


def test_cli_export_prints_the_check(tmp_path, capsys) -> None:
    weights = _checkpoint(tmp_path / "r.pt", "retinanet")
    assert main(["export", "--weights", weights, "--format", "torchscript"]) == 0
    out = capsys.readouterr().out
    assert "max difference from PyTorch" in out and (tmp_path / "r.torchscript.pt").exists()
    with pytest.raises(SystemExit):
        main(["export", "--weights", weights, "--format", "tflite"])
