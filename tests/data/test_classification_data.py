"""Classification data: image folders, label CSVs, crops of detection boxes, timm transforms, sampling."""

from __future__ import annotations

import json
import logging
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
from timm.data.auto_augment import AutoAugment, RandAugment

from vision.config import Config, SplitConfig, load_config
from vision.data.classification import (
    ClassificationDataset,
    build_classification_sets,
    build_cls_transform,
    crop_box,
    read_classification_split,
    read_image_folder,
    read_label_csv,
)
from vision.data.samplers import build_sampler
from vision.errors import ConfigError, DataError


def _write(path, value: int | np.ndarray, size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = value if isinstance(value, np.ndarray) else np.full((size[1], size[0], 3), value, np.uint8)
    cv2.imwrite(str(path), img)


def test_image_folder_classes_are_sorted_sub_folders(tmp_path) -> None:
    for cls, n in [("wbc", 2), ("platelet", 1), ("rbc", 3)]:
        for i in range(n):
            _write(tmp_path / cls / f"{i}.png", 40 * i)
    (tmp_path / "rbc" / "notes.txt").write_text("not an image")
    s = read_image_folder(tmp_path)
    assert list(s.categories.names) == ["platelet", "rbc", "wbc"]
    assert Counter(lab for smp in s.samples for lab in smp.labels) == {0: 1, 1: 3, 2: 2}
    assert all(smp.path.endswith(".png") and smp.box is None for smp in s.samples)
    ordered = read_image_folder(tmp_path, ["wbc", "rbc", "platelet"])
    assert Counter(smp.labels[0] for smp in ordered.samples) == {0: 2, 1: 3, 2: 1}
    with pytest.raises(DataError, match="no class sub-folders"):
        read_image_folder(tmp_path / "rbc")


def test_label_csv_single_and_multi_label(tmp_path) -> None:
    _write(tmp_path / "img" / "a.png", 10)
    _write(tmp_path / "img" / "b.png", 20)
    (tmp_path / "labels.csv").write_text("path,label\na.png,dog\nb.png,cat,dog\n")
    s = read_label_csv(tmp_path / "labels.csv", tmp_path / "img")
    assert list(s.categories.names) == ["cat", "dog"]
    assert [smp.labels for smp in s.samples] == [(1,), (0, 1)]
    assert s.samples[0].path == str(tmp_path / "img" / "a.png")
    assert s.multi_label
    assert s.targets().tolist() == [[0.0, 1.0], [1.0, 1.0]]
    (tmp_path / "bad.csv").write_text("a.png,bird\n")
    with pytest.raises(DataError, match=r"bad\.csv: a\.png: label 'bird' is not one of the classes"):
        read_label_csv(tmp_path / "bad.csv", tmp_path / "img", ["cat", "dog"])
    (tmp_path / "nolabel.csv").write_text("a.png\n")
    with pytest.raises(DataError, match=r"nolabel\.csv: row 1 .* has no label"):
        read_label_csv(tmp_path / "nolabel.csv")


def test_crop_box_margin_by_hand() -> None:
    # 40x20 box, 25% margin: 10 px left/right, 5 px above/below
    assert crop_box((10, 20, 50, 40), 100, 60, 0.25) == (0, 15, 60, 45)
    # clipped at the image border: 28x8 box, 50%: x1 = 2 - 14 -> 0, y2 = 58 + 4 -> 60
    assert crop_box((2, 50, 30, 58), 100, 60, 0.5) == (0, 46, 44, 60)
    # fractional: w 9.8, h 20.5, 10%: 10.5-0.98=9.52 -> 9, 10.2-2.05=8.15 -> 8, 21.28 -> 22, 32.75 -> 33
    assert crop_box((10.5, 10.2, 20.3, 30.7), 100, 60, 0.1) == (9, 8, 22, 33)
    assert crop_box((10, 20, 50, 40), 100, 60, 0.0) == (10, 20, 50, 40)


def test_crop_min_size_widens_small_boxes_about_their_centre() -> None:
    # a 10x10 box, at least 30 px: centre (45, 25) -> 30..60 x 10..40
    assert crop_box((40, 20, 50, 30), 100, 60, 0.0, 30) == (30, 10, 60, 40)
    # near the top-left corner the window shifts inside the image: -8..22 -> 0..30
    assert crop_box((2, 2, 12, 12), 100, 60, 0.0, 30) == (0, 0, 30, 30)
    # near the bottom-right corner: 79..109 -> 70..100, 39..69 -> 30..60
    assert crop_box((90, 50, 98, 58), 100, 60, 0.0, 30) == (70, 30, 100, 60)
    # larger than the image: the whole side
    assert crop_box((0, 0, 10, 10), 20, 20, 0.0, 30) == (0, 0, 20, 20)
    # the margin first (40x20 box + 25%: 60x30), then the minimum only where it is larger (y: 30 -> 40)
    assert crop_box((10, 20, 50, 40), 100, 60, 0.25, 40) == (0, 10, 60, 50)


def _coco(tmp_path) -> tuple:
    img = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    _write(tmp_path / "images" / "a.png", img)
    _write(tmp_path / "images" / "broken.png", 0)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 80, "height": 60},
                   {"id": 2, "file_name": "broken.png", "width": 12, "height": 10}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 20, 40, 20], "area": 800, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [60, 5, 10, 10], "area": 100, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 1},
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "small"}, {"id": 7, "name": "big"}],
    }
    (tmp_path / "train.json").write_text(json.dumps(coco))
    return img


def test_detection_boxes_become_labelled_crops_with_margin(tmp_path, caplog) -> None:
    img = _coco(tmp_path)
    split = SplitConfig(format="coco", ann="train.json", images="images")
    s = read_classification_split(split, str(tmp_path), margin=0.25)
    assert list(s.categories.names) == ["small", "big"]
    crops = {smp.labels: smp.box for smp in s.samples if smp.path.endswith("a.png")}
    # big: xywh (10, 20, 40, 20) -> xyxy (10, 20, 50, 40), 25% margin; small: (60, 5, 70, 15) + 2.5 px
    assert crops == {(1,): (0, 15, 60, 45), (0,): (57, 2, 73, 18)}, "the crowd region is not a sample"
    ds = ClassificationDataset(s)
    i = next(k for k, smp in enumerate(s.samples) if smp.labels == (1,))
    x, target = ds[i]
    expected = torch.from_numpy(img[15:45, 0:60][..., ::-1].copy()).permute(2, 0, 1).float() / 255  # BGR file
    torch.testing.assert_close(x, expected)
    assert int(target["label"]) == 1
    # the unreadable image is dropped with its name, by the config-level builder
    cfg = Config()
    cfg.model.arch = "classifier"
    cfg.data.root = str(tmp_path)
    cfg.data.train = split
    cfg.data.crop_margin = 0.25
    with caplog.at_level(logging.WARNING):
        train, val = build_classification_sets(cfg)
    assert val is train and len(train) == 2
    assert any("broken.png" in m for m in train.skipped_images)
    assert any("broken.png" in r.getMessage() for r in caplog.records)


def test_an_image_that_fails_to_decode_is_skipped_by_the_dataset(tmp_path, caplog) -> None:
    _write(tmp_path / "a" / "0.png", 10)
    _write(tmp_path / "b" / "0.png", 200)
    s = read_image_folder(tmp_path)
    (tmp_path / "a" / "0.png").write_bytes(b"garbage")
    ds = ClassificationDataset(s)
    with caplog.at_level(logging.WARNING):
        x, target = ds[0]
    assert int(target["label"]) == 1 and float(x.mean()) == pytest.approx(200 / 255)
    assert any("0.png" in r.getMessage() for r in caplog.records)


def test_timm_transforms_autoaugment_randaugment_and_eval(tmp_path) -> None:
    cfg = load_config(None, ["model.arch=classifier", "model.image_size=40", "data.augment.autoaugment=original"])
    t = build_cls_transform(cfg, training=True)
    assert any(isinstance(step, AutoAugment) for step in t.transforms)
    cfg.data.augment.autoaugment = "rand-m9-mstd0.5"
    t = build_cls_transform(cfg, training=True)
    assert any(isinstance(step, RandAugment) for step in t.transforms)
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    x = t(image)
    assert x.shape == (3, 40, 40) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    cfg.data.crop_pct = 1.0
    e = build_cls_transform(cfg, training=False)
    y = e(image)
    assert y.shape == (3, 40, 40) and torch.equal(y, e(image)), "the eval transform is deterministic"
    cfg.data.augment.autoaugment = ["not", "a", "policy"]
    with pytest.raises(ConfigError, match="timm policy"):
        build_cls_transform(cfg, training=True)


def test_class_balanced_sampler_draws_each_class_equally(tmp_path) -> None:
    for cls, n in [("common", 30), ("rare", 2), ("mid", 6)]:
        for i in range(n):
            _write(tmp_path / cls / f"{i}.png", i)
    s = read_image_folder(tmp_path)
    sampler = build_sampler("class_balanced", s.labels_per_image(), seed=0, epoch_length=30000)
    counts = Counter(s.samples[i].labels[0] for i in sampler)
    assert all(abs(c / 30000 - 1 / 3) < 0.02 for c in counts.values()) and len(counts) == 3
    uniform = Counter(s.samples[i].labels[0] for i in build_sampler("uniform", s.labels_per_image()))
    assert uniform == {0: 30, 1: 6, 2: 2}


def test_val_split_takes_train_class_names(tmp_path) -> None:
    for cls in ("a", "b"):
        _write(tmp_path / "train" / cls / "0.png", 1)
    _write(tmp_path / "val" / "b" / "0.png", 1)
    cfg = load_config(None, [
        "model.arch=classifier", f"data.root={tmp_path}", "data.train.format=folder", "data.train.images=train",
        "data.val.format=folder", "data.val.images=val",
    ])
    _, val = build_classification_sets(cfg)
    assert list(val.categories.names) == ["a", "b"] and val.samples[0].labels == (1,)
    (tmp_path / "multi.csv").write_text(f"{tmp_path}/train/a/0.png,a,b\n")
    cfg.data.train = SplitConfig(format="csv", ann="multi.csv")
    with pytest.raises(DataError, match=r"model\.multi_label=true"):
        build_classification_sets(cfg)
    cfg.data.train = SplitConfig(format="parquet", ann="x")
    with pytest.raises(ConfigError, match="unknown data format 'parquet'"):
        build_classification_sets(cfg)
