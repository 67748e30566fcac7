"""``vision inspect``: the data set report against what the synthetic generator says it wrote, the resize
against torchvision's, and the problems a damaged data set has."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vision.cli import main as cli
from vision.config import load_config
from vision.data.stats import best_anchor_iou, inspect_data, resize_scale
from vision.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inspect")
    info = make_synthetic_dataset(root / "data", num_train=24, num_val=8, image_size=(96, 64), classes=3,
                                  max_objects=4, long_tail=30.0, empty_fraction=0.25, seed=4)
    recipe = {
        "name": "insp", "output_dir": str(root / "runs"),
        "model": {"arch": "retinanet", "backbone": "test_resnet", "min_size": [128], "max_size": 192},
        "data": {"root": str(root / "data"), "train": {"ann": "train.json", "images": "images"},
                 "val": {"ann": "val.json", "images": "images"}},
    }
    cfg = root / "insp.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    return {"root": root, "info": info, "cfg": cfg}


def test_report_counts_what_the_generator_wrote(synthetic):
    info = synthetic["info"]
    report = inspect_data(load_config(synthetic["cfg"]))
    assert report["class_names"] == [c["name"] for c in info["categories"]]
    for split in ("train", "val"):
        s = report["splits"][split]
        assert s["images"] == info["num_images"][split]
        assert s["objects"] == info["num_annotations"][split]
        assert s["classes"]["counts"] == info["counts"][split]
        assert s["width"] == {"min": 96, "median": 96, "max": 96} and s["height"]["max"] == 64
        gt = json.loads(Path(info[split]).read_text())
        with_objects = {a["image_id"] for a in gt["annotations"]}
        assert s["objects_per_image"]["images_with_none"] == len(gt["images"]) - len(with_objects)
        assert s["unreadable_images"] == [] and s["dropped_boxes"] == []
    counts = list(info["counts"]["train"].values())
    assert report["splits"]["train"]["classes"]["imbalance"] == pytest.approx(max(counts) / min(counts), abs=0.01)
    assert any("class imbalance" in w and "data.sampler=repeat_factor" in w for w in report["warnings"])


def test_box_sizes_are_taken_after_the_models_resize(synthetic):
    """96x64 images at min_size 128 (max 192): every box grows by 2, torchvision's own factor."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    transform = GeneralizedRCNNTransform(128, 192, [0.0] * 3, [1.0] * 3).eval()
    boxes = torch.tensor([[10.0, 10.0, 30.0, 50.0]])
    _, targets = transform([torch.zeros(3, 64, 96)], [{"boxes": boxes.clone(), "labels": torch.tensor([1])}])
    factor = float(targets[0]["boxes"][0, 2] - targets[0]["boxes"][0, 0]) / 20.0
    assert resize_scale(96, 64, 128, 192) == pytest.approx(factor) == pytest.approx(2.0)
    assert resize_scale(1000, 100, 800, 1333) == pytest.approx(1.333)  # the longer side's limit binds
    report = inspect_data(load_config(synthetic["cfg"]))["splits"]["train"]["box_side_px"]
    for p in ("p1", "p50", "p99"):
        assert report["resized"][p] == pytest.approx(2 * report["original"][p], abs=0.02)


def test_best_anchor_iou_known_answers():
    wh = np.array([[20.0, 20.0], [10.0, 40.0], [32.0, 32.0]])
    iou = best_anchor_iou(wh, [32], [1.0])
    np.testing.assert_allclose(iou, [400 / 1024, 320 / (400 + 1024 - 320), 1.0])
    # aspect ratio 2 is torchvision's h/w = 2: a 20-px anchor 14.1 wide and 28.3 high
    inter = 10 * 20 * np.sqrt(2)
    assert best_anchor_iou(wh[1:2], [20], [2.0])[0] == pytest.approx(inter / (400 + 400 - inter))


def test_anchors_too_large_for_the_boxes_are_reported(synthetic):
    cfg = load_config(synthetic["cfg"], ["model.anchor_sizes=[[256],[320],[400],[512],[640]]"])
    report = inspect_data(cfg)
    a = report["splits"]["train"]["anchors"]
    assert a["sizes"] == [256, 320, 400, 512, 640] and a["covered"] == 0.0
    assert a["smaller_than_smallest"] == a["boxes"] == report["splits"]["train"]["objects"]
    assert any("match no anchor shape" in w for w in report["warnings"])


def test_problems_the_readers_find_are_reported(synthetic, tmp_path, capfd):
    data = tmp_path / "data"
    info = make_synthetic_dataset(data, num_train=6, num_val=0, image_size=(64, 64), classes=2, seed=1)
    gt = json.loads(Path(info["train"]).read_text())
    (data / "images" / gt["images"][0]["file_name"]).write_bytes(b"")  # unreadable
    gt["images"][1]["width"] = 65  # annotation disagrees with the file
    for a in gt["annotations"]:  # (its masks would be refused for the size: keep its boxes only)
        if a["image_id"] == gt["images"][1]["id"]:
            a.pop("segmentation", None)
    gt["annotations"][0]["bbox"] = [5, 5, 0, 10]  # zero area
    readable = [a for a in gt["annotations"] if a["image_id"] != gt["images"][0]["id"]]
    dup = dict(readable[-1], id=10_000)  # the same object twice
    gt["annotations"].append(dup)
    Path(info["train"]).write_text(json.dumps(gt))
    recipe = {"name": "bad", "model": {"arch": "faster_rcnn"},
              "data": {"root": str(data), "train": {"ann": "train.json", "images": "images"}}}
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "report"
    assert cli(["inspect", str(cfg), "--out", str(out)]) == 0
    text = capfd.readouterr().out
    written = json.loads((out / "inspect.json").read_text())
    s = written["splits"]["train"]
    assert len(s["unreadable_images"]) == 1 and "empty file" in s["unreadable_images"][0]
    assert len(s["size_mismatches"]) == 1 and "annotated 65x64, file is 64x64" in s["size_mismatches"][0]
    assert len(s["dropped_boxes"]) == 1 and "zero-area" in s["dropped_boxes"][0]
    assert s["duplicate_boxes"] == 1 and s["images"] == 5 and "val" not in written["splits"]
    assert s["anchors"]["sizes"] == [32, 64, 128, 256, 512]  # Faster R-CNN's defaults
    for what in ("unreadable images", "annotated size differs", "zero-area boxes", "box pairs overlap"):
        assert what in text
    assert text.strip().splitlines()[-1].endswith(f"{out / 'inspect.json'}, {out / 'inspect.png'}")
    import cv2

    assert cv2.imread(str(out / "inspect.png")).shape[:2] == (950, 1600)


def test_a_classification_recipe_is_reported_by_its_crops(synthetic, tmp_path):
    cfg = load_config(synthetic["cfg"], ["model.arch=classifier", "data.crop_min_size=16"])
    report = inspect_data(cfg)
    s = report["splits"]["train"]
    assert s["samples"] == synthetic["info"]["num_annotations"]["train"]
    assert s["classes"]["counts"] == synthetic["info"]["counts"]["train"]
    assert s["crop_side_px"]["p0"] >= 16
    assert any("data.sampler=class_balanced" in w for w in report["warnings"])
    from vision.metrics.data_plots import plot_dataset_report

    plot_dataset_report(report, tmp_path / "cls.png")
