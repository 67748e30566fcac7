"""Checkpoint files, weight loading into vision's models, pretrained backbone weights."""

from __future__ import annotations

import logging
import math
import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

from vision.config import ModelConfig
from vision.errors import VisionError
from vision.models import build_model
from vision.models.backbone import build_backbone
from vision.models.weights import (
    infer_arch,
    load_checkpoint,
    load_model_weights,
    num_classes_in,
    save_checkpoint,
)


def _small(arch: str, num_classes: int = 3, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, backbone="resnet18", num_classes=num_classes, fpn_channels=32, **kw)
    return build_model(cfg)


def _equal(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


# --- checkpoint files -------------------------------------------------------------------------


def test_save_and_load_roundtrip(tmp_path) -> None:
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    ckpt = {"model": sd, "config": {"model": {"arch": "retinanet"}}, "class_names": ["a", "b"], "arch": "retinanet"}
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(ckpt, path)
    assert os.listdir(path.parent) == ["last.pt"]
    got = load_checkpoint(path)
    assert got["class_names"] == ["a", "b"] and got["arch"] == "retinanet"
    assert torch.equal(got["model"]["w"], sd["w"])


def test_failed_save_keeps_the_previous_checkpoint(tmp_path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)
    with pytest.raises(Exception):  # noqa: B017  a lambda cannot be pickled
        save_checkpoint({"model": {"w": torch.zeros(2)}, "bad": lambda: 0}, path)
    assert os.listdir(tmp_path) == ["last.pt"], "no temporary file is left behind"
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))


def test_plain_state_dicts_are_wrapped(tmp_path) -> None:
    sd = {"a.weight": torch.ones(3)}
    torch.save(sd, tmp_path / "plain.pth")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    save_file(sd, str(tmp_path / "w.safetensors"))
    for name in ["plain.pth", "wrapped.pth", "w.safetensors"]:
        got = load_checkpoint(tmp_path / name)
        assert list(got["model"]) == ["a.weight"] and "config" not in got


def test_unreadable_checkpoints_are_one_line_errors(tmp_path) -> None:
    with pytest.raises(VisionError, match=r"missing\.pt: checkpoint file not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(VisionError, match=r"junk\.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    save_checkpoint({"model": {"w": torch.rand(1000)}}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(VisionError, match=r"cut\.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"epoch": 3}, tmp_path / "noweights.pt")
    with pytest.raises(VisionError, match=r"noweights\.pt: no model weights"):
        load_checkpoint(tmp_path / "noweights.pt")


# --- loading into models ------------------------------------------------------------------------


def test_vision_checkpoint_loads_into_a_fresh_model(tmp_path) -> None:
    a = _small("retinanet", seed=0)
    b = _small("retinanet", seed=1)
    path = tmp_path / "best.pt"
    save_checkpoint({"model": a.state_dict(), "class_names": ["x", "y", "z"], "arch": "retinanet"}, path)
    result = load_model_weights(b, str(path))
    assert (result.missing, result.unexpected, result.reheaded) == ([], [], [])
    sa, sb = a.state_dict(), b.state_dict()
    assert _equal(sa, sb, sa)


@pytest.mark.parametrize(
    ("arch", "layers"),
    [
        ("retinanet", {"head.classification_head.cls_logits"}),
        ("faster_rcnn", {"roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"}),
        (
            "mask_rcnn",
            {
                "roi_heads.box_predictor.cls_score",
                "roi_heads.box_predictor.bbox_pred",
                "roi_heads.mask_predictor.mask_fcn_logits",
            },
        ),
    ],
)
def test_other_class_count_is_reheaded(arch: str, layers: set[str], caplog) -> None:
    src = _small(arch, num_classes=5, seed=0).state_dict()
    model = _small(arch, num_classes=3, seed=1)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        result = load_model_weights(model, {"model": src, "class_names": list("abcde"), "arch": arch})
    assert {k.rsplit(".", 1)[0] for k in result.reheaded} == layers
    assert result.missing == [] and result.unexpected == []
    got = model.state_dict()
    head = [k for k in got if k.rsplit(".", 1)[0] in layers]
    rest = [k for k in got if k not in head]
    assert _equal(got, init, head), "class-logit layers keep the new model's initialisation"
    assert _equal(got, src, rest), "everything else comes from the checkpoint"
    notices = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert "5 classes, the model 3" in notices[0]


def test_other_architecture_is_refused() -> None:
    faster = _small("faster_rcnn").state_dict()
    with pytest.raises(VisionError, match=r"is a faster_rcnn model but the config builds retinanet"):
        load_model_weights(_small("retinanet"), faster)
    mask = _small("mask_rcnn").state_dict()
    with pytest.raises(VisionError, match=r"is a mask_rcnn model but the config builds faster_rcnn"):
        load_model_weights(_small("faster_rcnn"), mask)
    with pytest.raises(VisionError, match=r"is a faster_rcnn model but the config builds mask_rcnn"):
        load_model_weights(_small("mask_rcnn"), {"model": mask, "arch": "faster_rcnn"})


def test_other_backbone_width_is_an_error_not_a_rehead() -> None:
    src = _small("retinanet").state_dict()
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="retinanet", backbone="resnet18", num_classes=3, fpn_channels=48))
    with pytest.raises(VisionError, match=r"has shape .* another backbone or fpn_channels"):
        load_model_weights(model, src)


def test_strict_and_lenient_loading() -> None:
    src = _small("faster_rcnn").state_dict()
    del src["roi_heads.box_head.fc6.weight"]
    src["extra.weight"] = torch.zeros(1)
    with pytest.raises(VisionError, match=r"1 missing \(roi_heads.box_head.fc6.weight\); 1 unexpected"):
        load_model_weights(_small("faster_rcnn", seed=1), src)
    result = load_model_weights(_small("faster_rcnn", seed=1), src, strict=False)
    assert result.missing == ["roi_heads.box_head.fc6.weight"] and result.unexpected == ["extra.weight"]


def test_legacy_and_wrapped_key_layouts_load() -> None:
    """Older torchvision names, DDP prefixes and frozen-BN checkpoints (no batch counters)."""
    src = _small("mask_rcnn").state_dict()
    legacy = {}
    for k, v in src.items():
        if k.endswith("num_batches_tracked"):
            continue
        k = k.replace("fpn.inner_blocks.0.0.", "fpn.inner_blocks.0.").replace("fpn.layer_blocks.3.0.", "fpn.layer_blocks.3.")
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            k = k.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        legacy["module." + k] = v
    assert len(legacy) < len(src)
    model = _small("mask_rcnn", seed=1)
    result = load_model_weights(model, legacy)
    assert (result.missing, result.unexpected) == ([], [])
    got = model.state_dict()
    assert _equal(got, src, [k for k in src if not k.endswith("num_batches_tracked")])


def test_flattened_timm_names_are_matched() -> None:
    """A full-model name (``stages.0``) finds the feature model's flattened one (``stages_0``)."""
    src = build_model(ModelConfig(arch="retinanet", backbone="convnext_atto", num_classes=2, fpn_channels=32))
    sd = {k.replace("body.stages_", "body.stages.").replace("body.stem_", "body.stem."): v for k, v in src.state_dict().items()}
    assert "backbone.body.stages.0.blocks.0.conv_dw.weight" in sd
    torch.manual_seed(5)
    model = build_model(ModelConfig(arch="retinanet", backbone="convnext_atto", num_classes=2, fpn_channels=32))
    load_model_weights(model, sd)
    assert _equal(model.state_dict(), src.state_dict(), src.state_dict())


def test_architecture_and_classes_from_torchvision_state_dicts() -> None:
    tv = torchvision.models.detection
    assert infer_arch(tv.retinanet_resnet50_fpn(weights=None, weights_backbone=None).state_dict()) == "retinanet"
    sd = tv.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=7).state_dict()
    assert infer_arch(sd) == "faster_rcnn" and num_classes_in(sd) == 6
    assert num_classes_in(_small("retinanet", num_classes=4).state_dict()) == 4


# --- pretrained backbone weights ------------------------------------------------------------------


def _body_matches(body: torch.nn.Module, source: dict[str, torch.Tensor], rename=lambda k: k) -> None:
    own = {k: v for k, v in body.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert own
    for k, v in own.items():
        assert torch.equal(v, source[rename(k)]), k


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_atto"])
def test_local_timm_checkpoint_as_pretrained_backbone(tmp_path, name: str) -> None:
    torch.manual_seed(3)
    ref = timm.create_model(name).state_dict()
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in ref.items()}, str(path))
    bb = build_backbone(name, pretrained=str(path), levels="retinanet")
    _body_matches(bb.body, ref, lambda k: k.replace("stages_", "stages.").replace("stem_", "stem."))


def test_torchvision_resnet_checkpoint_as_pretrained_backbone(tmp_path) -> None:
    torch.manual_seed(4)
    ref = torchvision.models.resnet18().state_dict()
    torch.save(ref, tmp_path / "resnet18_tv.pth")
    bb = build_backbone("resnet18", pretrained=str(tmp_path / "resnet18_tv.pth"))
    _body_matches(bb.body, ref)
    # the same weights inside a DDP-wrapped training checkpoint, and inside a torchvision detector
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.items()}}, tmp_path / "ddp.pth")
    _body_matches(build_backbone("resnet18", pretrained=str(tmp_path / "ddp.pth")).body, ref)
    det = _resnet_fpn_extractor(torchvision.models.resnet18(), 5)
    det.body.load_state_dict({k: v for k, v in ref.items() if not k.startswith("fc.")})
    torch.save({f"backbone.{k}": v for k, v in det.state_dict().items()}, tmp_path / "det.pth")
    _body_matches(build_backbone("resnet18", pretrained=str(tmp_path / "det.pth")).body, ref)


def test_incomplete_or_missing_backbone_files_are_refused(tmp_path) -> None:
    ref = torchvision.models.resnet18().state_dict()
    torch.save({k: v for k, v in ref.items() if not k.startswith("layer4.")}, tmp_path / "part.pth")
    with pytest.raises(VisionError, match=r"part\.pth: \d+ weights of backbone 'resnet18' are not in the file"):
        build_backbone("resnet18", pretrained=str(tmp_path / "part.pth"))
    with pytest.raises(VisionError, match=r"nope\.safetensors: pretrained weights file not found"):
        build_backbone("resnet18", pretrained=str(tmp_path / "nope.safetensors"))


def test_hub_name_offline_fails_fast_and_says_what_to_do(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cfg = ModelConfig(arch="retinanet", backbone="resnet18", pretrained="resnet18.a1_in1k", num_classes=3)
    start = time.perf_counter()
    with pytest.raises(VisionError) as err:
        build_model(cfg)
    assert time.perf_counter() - start < 2.0
    msg = str(err.value)
    assert "'resnet18.a1_in1k'" in msg and "model.pretrained=/path/to/" in msg and "\n" not in msg


def test_hub_name_of_another_architecture_or_unknown_tag_is_a_config_error() -> None:
    from vision.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'resnet50.a1_in1k' is not a 'resnet18' model"):
        build_backbone("resnet18", pretrained="resnet50.a1_in1k")
    with pytest.raises(ConfigError, match=r"model.pretrained 'resnet18.no_such_tag'"):
        build_backbone("resnet18", pretrained="resnet18.no_such_tag")


# --- building for a checkpoint ------------------------------------------------------------------


def test_initialisers_are_skipped_only_inside_and_restored() -> None:
    from vision.models.skip_init import initialisers_skipped

    w = torch.full((4, 4), 7.0)
    with initialisers_skipped():
        torch.nn.init.kaiming_normal_(w)
        torch.nn.init.zeros_(w)
        assert torch.equal(w, torch.full((4, 4), 7.0))
    torch.nn.init.zeros_(w)
    assert torch.equal(w, torch.zeros(4, 4))


@pytest.mark.parametrize("num_classes", [None, 5])
def test_inference_loading_holds_the_checkpoints_weights(tmp_path, num_classes) -> None:
    """Built without initialisation, the model holds exactly the checkpoint's weights; where the config
    asks for another class count (re-headed layers) it is built with its initialisation after all."""
    from vision.config import Config, config_to_dict
    from vision.inference.loading import load_for_inference

    cfg = Config()
    cfg.model = ModelConfig(arch="retinanet", backbone="resnet18", num_classes=3, fpn_channels=32)
    src = _small("retinanet", seed=3).state_dict()
    path = tmp_path / "best.pt"
    save_checkpoint({"model": src, "config": config_to_dict(cfg), "class_names": ["x", "y", "z"],
                     "arch": "retinanet"}, path)
    overrides = [] if num_classes is None else [f"model.num_classes={num_classes}"]
    got = load_for_inference(path, overrides=overrides).model.state_dict()
    same = [k for k in got if got[k].shape == src[k].shape]
    assert _equal(got, src, same)
    reheaded = [k for k in got if k not in same]
    assert len(reheaded) == (0 if num_classes is None else 2)
    if reheaded:  # initialised, not left as allocated: torchvision's prior-probability bias, 0.01
        bias = got["head.classification_head.cls_logits.bias"]
        torch.testing.assert_close(bias, torch.full_like(bias, -math.log(99)))
