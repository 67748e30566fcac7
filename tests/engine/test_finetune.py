"""Transfer learning: pretrained backbone files, freezing, layer-wise lr decay, fine-tuning initialisation,
and a tiny classification run through the trainer."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import time

import cv2
import numpy as np
import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from vision.config import ModelConfig, load_config
from vision.engine.optim import build_optimizer, build_scheduler
from vision.errors import VisionError
from vision.models import build_model, save_checkpoint

# --- pretrained backbone files ------------------------------------------------------------------


def _timm_resnet18_file(tmp_path) -> tuple[str, dict]:
    torch.manual_seed(11)
    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    path = tmp_path / "resnet18_timm.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path), sd


def _torchvision_resnet18_file(tmp_path) -> tuple[str, dict]:
    torch.manual_seed(12)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18_torchvision.pth"
    torch.save(sd, path)
    return str(path), sd


def _assert_backbone_equals(body: torch.nn.Module, source: dict) -> None:
    own = {k: v for k, v in body.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert own, "the backbone has weights"
    missing = [k for k in own if k not in source]
    assert not missing, f"backbone keys not in the file: {missing[:3]}"
    for k, v in own.items():
        assert torch.equal(v, source[k]), k


@pytest.mark.parametrize("maker", [_timm_resnet18_file, _torchvision_resnet18_file], ids=["timm", "torchvision"])
@pytest.mark.parametrize("arch", ["classifier", "retinanet", "faster_rcnn"])
def test_local_timm_and_torchvision_checkpoints_load_as_pretrained_backbones(tmp_path, maker, arch) -> None:
    path, source = maker(tmp_path)
    model = build_model(ModelConfig(arch=arch, backbone="resnet18", num_classes=4, fpn_channels=16, pretrained=path))
    _assert_backbone_equals(model.backbone.body, source)
    if arch == "classifier":
        assert model.head.fc.out_features == 4, "the head is new, sized for the config's classes"


def test_a_hub_name_offline_fails_at_once_naming_the_local_file_option() -> None:
    t0 = time.monotonic()
    with pytest.raises(VisionError, match=r"model\.pretrained=/path/to/weights\.safetensors"):
        build_model(ModelConfig(arch="classifier", backbone="resnet18", num_classes=3, pretrained="resnet18.a1_in1k"))
    assert time.monotonic() - t0 < 5.0


def test_a_classifier_checkpoint_initialises_a_detector_backbone_and_back(tmp_path) -> None:
    torch.manual_seed(3)
    cls = build_model(ModelConfig(arch="classifier", backbone="resnet18", num_classes=3))
    save_checkpoint({"model": cls.state_dict(), "arch": "classifier"}, tmp_path / "cls.pt")
    det = build_model(ModelConfig(arch="retinanet", backbone="resnet18", num_classes=2, fpn_channels=16,
                                  pretrained=str(tmp_path / "cls.pt")))
    src = {k[len("backbone.body."):]: v for k, v in cls.state_dict().items() if k.startswith("backbone.body.")}
    _assert_backbone_equals(det.backbone.body, src)
    save_checkpoint({"model": det.state_dict(), "arch": "retinanet"}, tmp_path / "det.pt")
    back = build_model(ModelConfig(arch="classifier", backbone="resnet18", num_classes=5,
                                   pretrained=str(tmp_path / "det.pt")))
    _assert_backbone_equals(back.backbone.body, src)


# --- layer-wise learning-rate decay, freezing ------------------------------------------------------


def _lr_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float]:
    by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


def test_layer_decay_learning_rates_by_hand() -> None:
    cfg = load_config(None, ["train.lr=0.1", "train.layer_decay=0.5", "train.weight_decay=0.01"])
    model = build_model(ModelConfig(arch="classifier", backbone="resnet18", num_classes=3))
    opt = build_optimizer(model, cfg.train)
    lr = _lr_of(opt, model)
    # resnet18 stages: stem (0), layer1..layer4 (1..4), everything after the backbone (5)
    expected = {
        "backbone.body.conv1.weight": 0.1 * 0.5**5,
        "backbone.body.bn1.bias": 0.1 * 0.5**5,
        "backbone.body.layer1.0.conv1.weight": 0.1 * 0.5**4,
        "backbone.body.layer2.1.bn2.weight": 0.1 * 0.5**3,
        "backbone.body.layer3.0.downsample.0.weight": 0.1 * 0.5**2,
        "backbone.body.layer4.1.conv2.weight": 0.1 * 0.5,
        "head.se.fc1.weight": 0.1,
        "head.fc.weight": 0.1,
        "head.fc.bias": 0.1,
    }
    for name, value in expected.items():
        assert lr[name] == pytest.approx(value), name
    assert len(lr) == len(list(model.parameters()))
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert decay[id(params["backbone.body.layer4.1.conv2.weight"])] == 0.01
    assert decay[id(params["backbone.body.layer4.1.bn2.bias"])] == 0.0
    # the schedule scales every group alike: the ratios stay
    cfg.train.warmup_iters = 0
    sched = build_scheduler(opt, cfg.train, total_iters=10)
    for _ in range(3):
        opt.step()
        sched.step()
    lr3 = _lr_of(opt, model)
    ratio = lr3["head.fc.weight"] / 0.1
    assert 0 < ratio < 1
    assert lr3["backbone.body.conv1.weight"] == pytest.approx(0.1 * 0.5**5 * ratio)

    det = build_model(ModelConfig(arch="faster_rcnn", backbone="resnet18", num_classes=3, fpn_channels=16))
    dlr = _lr_of(build_optimizer(det, cfg.train), det)
    assert dlr["backbone.body.layer2.0.conv1.weight"] == pytest.approx(0.1 * 0.5**3)
    assert dlr["backbone.fpn.inner_blocks.0.0.weight"] == pytest.approx(0.1)
    assert dlr["roi_heads.box_predictor.cls_score.weight"] == pytest.approx(0.1)


def test_layer_decay_groups_flattened_timm_feature_networks() -> None:
    cfg = load_config(None, ["train.lr=1.0", "train.layer_decay=0.5"])
    model = build_model(ModelConfig(arch="classifier", backbone="convnext_atto", num_classes=3))
    lr = _lr_of(build_optimizer(model, cfg.train), model)
    # convnext: stem (0), stages 0..3 (1..4), head (5); the feature network calls them stem_0, stages_0
    assert lr["backbone.body.stem_0.weight"] == pytest.approx(0.5**5)
    assert lr["backbone.body.stages_0.blocks.0.conv_dw.weight"] == pytest.approx(0.5**4)
    assert lr["backbone.body.stages_3.blocks.1.mlp.fc2.weight"] == pytest.approx(0.5)
    assert lr["head.fc.weight"] == pytest.approx(1.0)


# --- data on disk ---------------------------------------------------------------------------------


def _colour_folder(root, n: int = 8) -> None:
    """Two classes a network tells apart at once: reddish and bluish noise."""
    rng = np.random.default_rng(0)
    for cls, channel in (("blue", 0), ("red", 2)):  # BGR files
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 80, (20, 20, 3), dtype=np.uint8)
            img[..., channel] = rng.integers(170, 255, (20, 20), dtype=np.uint8)
            cv2.imwrite(str(root / cls / f"{i}.png"), img)


def _cls_cfg(tmp_path, *extra: str):
    return load_config(None, [
        "model.arch=classifier", "model.backbone=test_resnet", "model.image_size=32",
        f"data.root={tmp_path / 'data'}", "data.train.format=folder", "data.train.images=.",
        "data.batch_size=4", "data.num_workers=0", "data.sampler=class_balanced",
        "data.augment.autoaugment=original",
        "train.device=cpu", "train.optimizer=adamw", "train.lr=0.003", "train.warmup_iters=0",
        "train.epochs=3", "train.log_every=2", "train.ckpt_every_iters=0", *extra,
    ])


def test_freeze_backbone_trains_the_head_only_until_unfreeze_at(tmp_path) -> None:
    from vision.tasks.training import train

    _colour_folder(tmp_path / "data", n=4)
    cfg = _cls_cfg(tmp_path, "train.freeze=backbone", "train.unfreeze_at=1", "train.epochs=2",
                   "train.eval_every=0", "train.layer_decay=0.5")
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def hook(event: str, trainer) -> None:
        if event == "start":
            params = dict(trainer.model.named_parameters())
            assert not params["backbone.body.conv1.0.weight"].requires_grad
            assert params["head.fc.weight"].requires_grad
            # frozen now, in the optimizer for later, with their stage's learning rate
            lr = _lr_of(trainer.optimizer, trainer.model)
            assert lr["backbone.body.conv1.0.weight"] == pytest.approx(0.003 * 0.5**5)
        if event in ("start", "epoch"):
            seen[len(seen)] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    train(cfg, tmp_path / "run", hooks=[hook])
    start, after0, after1 = seen[0], seen[1], seen[2]
    body = [n for n in start if n.startswith("backbone.")]
    assert all(torch.equal(start[n], after0[n]) for n in body), "epoch 0: the backbone is frozen"
    assert not torch.equal(start["head.fc.weight"], after0["head.fc.weight"]), "epoch 0: the head trains"
    assert any(not torch.equal(after0[n], after1[n]) for n in body), "epoch 1: unfrozen"


def test_tiny_classification_run_checkpoint_predict_and_report(tmp_path) -> None:
    import vision
    from vision.cli import main
    from vision.errors import ConfigError
    from vision.models import load_checkpoint
    from vision.tasks.training import train

    _colour_folder(tmp_path / "data")
    cfg = _cls_cfg(tmp_path, "train.epochs=4", "train.eval_every=2", "model.label_smoothing=0.1")
    summary = train(cfg, tmp_path / "run")
    assert summary["score_name"] == "top-1"
    assert 0.0 <= summary["score"] <= 1.0
    assert summary["best_score"] >= 0.9, "red and blue noise are told apart within 16 steps"
    m = summary["metrics"]
    assert set(m["per_class_accuracy"]) == {"blue", "red"} and m["num_samples"] == 16
    assert sum(map(sum, m["confusion_matrix"]["matrix"])) == 16
    best = tmp_path / "run" / "best.pt"
    ckpt = load_checkpoint(best)
    assert ckpt["arch"] == "classifier" and ckpt["class_names"] == ["blue", "red"]
    model = vision.load(best, device="cpu")
    assert model.task.name == "classification"

    paths = sorted(str(p) for p in (tmp_path / "data").rglob("*.png"))
    (tmp_path / "bad.png").write_bytes(b"nope")
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{p}\n" for p in [*paths, str(tmp_path / "bad.png")]))
    assert main(["predict", "--weights", str(best), "--source", str(listed), "--out", str(tmp_path / "pred"),
                 "--device", "cpu", "--workers", "0"]) == 0
    rows = (tmp_path / "pred" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "file,class,score" and len(rows) == 17
    skipped = json.loads((tmp_path / "pred" / "skipped.json").read_text())
    assert [s["file_name"] for s in skipped] == ["bad.png"]
    # the API answers as the command does: the same top class and probability for every image
    by_file = {r.split(",")[0]: r.split(",")[1:] for r in rows[1:]}
    for r in model.predict(paths, workers=0):
        name = str(Path(r.path).relative_to(tmp_path))
        assert [r.top_k[0][0], f"{r.top_k[0][1]:.6f}"] == by_file[name]
        assert r.probs.shape == (2,) and abs(float(r.probs.sum()) - 1.0) < 1e-5
        assert r.image.shape == (*r.shape, 3) and r.image.dtype == np.uint8  # the image as read, for draw()
    # --amp (bfloat16 where the CPU runs it natively) gives the same classes; a precision the device lacks
    # fails up front
    assert main(["predict", "--weights", str(best), "--source", str(listed), "--out", str(tmp_path / "pred_amp"),
                 "--device", "cpu", "--workers", "0", "--amp"]) == 0
    assert (tmp_path / "pred_amp" / "predictions.csv").read_text().count(",red,") == "\n".join(rows).count(",red,")
    with pytest.raises(ConfigError, match="fp16"):
        vision.load(best, device="cpu", precision="fp16")
    metrics = vision.evaluate(best, out=tmp_path / "report" / "metrics.json")
    assert metrics["top1"] == pytest.approx(summary["best_score"]), "best.pt scores what it scored in training"
    assert (tmp_path / "report" / "confusion_matrix.png").is_file()
    assert main(["eval", "--weights", str(best), "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["top1"] == pytest.approx(summary["best_score"])


# --- fine-tuning initialisation --------------------------------------------------------------------


def _synthetic(tmp_path):
    from vision.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "syn", num_train=4, num_val=2, image_size=(64, 48), classes=3, seed=1)
    return tmp_path / "syn"


def _det_cfg(root, arch: str, *extra: str):
    return load_config(None, [
        f"model.arch={arch}", "model.backbone=test_resnet", "model.fpn_channels=16", "model.min_size=[48]",
        "model.max_size=64", f"data.root={root}", "data.train.ann=train.json", "data.train.images=images",
        "data.val.ann=val.json", "data.val.images=images", "data.num_workers=0", "train.device=cpu", *extra,
    ])


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_detector_fine_tuning_keeps_all_but_the_class_layers(tmp_path, arch) -> None:
    from vision.tasks.training import build_trainer

    root = _synthetic(tmp_path)
    torch.manual_seed(0)
    source = build_model(ModelConfig(arch=arch, backbone="test_resnet", num_classes=7, fpn_channels=16,
                                     min_size=[48], max_size=64))
    src = source.state_dict()
    save_checkpoint({"model": src, "arch": arch, "class_names": [str(i) for i in range(7)]}, tmp_path / "src.pt")
    cfg = _det_cfg(root, arch, f"model.init_from={tmp_path / 'src.pt'}")
    trainer = build_trainer(cfg, tmp_path / "run")
    assert cfg.model.num_classes == 3
    own = trainer.model.state_dict()
    class_layers = ("head.classification_head.cls_logits.", "roi_heads.box_predictor.")
    kept = [k for k in own if not k.startswith(class_layers)]
    assert any(k.startswith("backbone.fpn.") for k in kept)
    assert any(k.startswith(("head.regression_head.", "rpn.head.bbox_pred")) for k in kept), "box regression"
    for k in kept:
        assert torch.equal(own[k].cpu(), src[k]), k
    for k in own:
        if k.startswith(class_layers) and k.endswith("weight"):
            assert own[k].shape != src[k].shape, f"{k} is re-created for 3 classes"


def test_a_torchvision_detector_state_dict_initialises_a_vision_retinanet(tmp_path) -> None:
    from torchvision.models.detection import retinanet_resnet50_fpn

    from vision.models.weights import load_model_weights

    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    sd = tv.state_dict()
    model = build_model(ModelConfig(arch="retinanet", backbone="resnet50", num_classes=3))
    result = load_model_weights(model, sd)
    assert sorted({k.rsplit(".", 1)[0] for k in result.reheaded}) == ["head.classification_head.cls_logits"]
    own = model.state_dict()
    for k in ("backbone.body.layer3.2.conv2.weight", "backbone.fpn.layer_blocks.1.0.weight",
              "head.regression_head.bbox_reg.weight", "head.classification_head.conv.0.0.weight"):
        assert torch.equal(own[k], sd[k]), k


def test_classifier_fine_tuning_from_a_classifier_checkpoint(tmp_path) -> None:
    from vision.tasks.training import build_trainer

    _colour_folder(tmp_path / "data", n=2)
    torch.manual_seed(4)
    source = build_model(ModelConfig(arch="classifier", backbone="test_resnet", num_classes=5, image_size=32))
    src = source.state_dict()
    save_checkpoint({"model": src, "arch": "classifier", "class_names": list("abcde")}, tmp_path / "src.pt")
    cfg = _cls_cfg(tmp_path, f"model.init_from={tmp_path / 'src.pt'}")
    trainer = build_trainer(cfg, tmp_path / "run")
    own = trainer.model.state_dict()
    assert own["head.fc.weight"].shape == (2, src["head.fc.weight"].shape[1])
    for k in own:
        if not k.startswith("head.fc."):
            assert torch.equal(own[k].cpu(), src[k]), k


def test_tiny_multi_label_run_is_scored_by_map(tmp_path) -> None:
    from vision.tasks.training import train

    _colour_folder(tmp_path / "data", n=4)
    rows = []
    for p in sorted((tmp_path / "data").rglob("*.png")):
        labels = [p.parent.name] + (["bright"] if p.stem in ("0", "1") else [])
        rows.append(",".join([str(p), *labels]))
    (tmp_path / "data" / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    cfg = _cls_cfg(tmp_path, "model.multi_label=true", "data.train.format=csv", "data.train.ann=labels.csv",
                   "train.epochs=1", "data.sampler=uniform")
    summary = train(cfg, tmp_path / "run")
    assert summary["score_name"] == "mAP"
    m = summary["metrics"]
    assert set(m["per_class_AP"]) == {"blue", "bright", "red"} and m["num_samples"] == 8
    assert summary["score"] == pytest.approx(m["mAP"])
