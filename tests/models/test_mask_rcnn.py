"""Mask R-CNN: crowd regions handled as COCO does, and images with hundreds of instances."""

from __future__ import annotations

import contextlib
import io
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vision.config import load_config
from vision.data.coco import coco_to_detection_set
from vision.data.dataset import DetectionDataset
from vision.data.transforms import build_eval_transform
from vision.metrics.coco import evaluate_detections
from vision.models import build_model


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _box_mask(h: int, w: int, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def _mask_rcnn_overrides(root: Path, size: int, **extra: str) -> list[str]:
    split = lambda s: json.dumps({"format": "coco", "ann": f"{s}.json", "images": "images"})  # noqa: E731
    return [
        "model.arch=mask_rcnn", "model.backbone=test_resnet", "model.fpn_channels=32",
        "model.anchor_sizes=[[8], [16], [32], [64], [128]]", f"model.min_size=[{size}]", f"model.max_size={size}",
        f"data.root={root}", f"data.train={split('train')}", f"data.val={split('val')}", "data.batch_size=1",
        "data.num_workers=0", "train.max_iters=1", "train.warmup_iters=1", "train.device=cpu", "train.lr=0.001",
        f"output_dir={root / 'runs'}", "name=mrcnn",
        *[f"{k}={v}" for k, v in extra.items()],
    ]


# crowd --------------------------------------------------------------------------------------------


@pytest.fixture
def crowd_data(tmp_path) -> Path:
    h = w = 64
    (tmp_path / "images").mkdir()
    img = np.full((h, w, 3), 40, np.uint8)
    img[10:30, 10:30] = 220
    img[40:60, 40:60] = 180
    cv2.imwrite(str(tmp_path / "images" / "a.png"), img)
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "width": w, "height": h}],
        "categories": [{"id": 1, "name": "blob"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0, "bbox": [10, 10, 20, 20], "area": 400,
             "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
            {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 1, "bbox": [40, 40, 20, 20], "area": 400,
             "segmentation": _rle(_box_mask(h, w, 40, 40, 60, 60))},
        ],
    }
    for split in ("train", "val"):
        (tmp_path / f"{split}.json").write_text(json.dumps(coco))
    return tmp_path


def test_crowd_left_out_of_training_targets(crowd_data):
    det_set = coco_to_detection_set(json.loads((crowd_data / "train.json").read_text()), "train.json",
                                    crowd_data / "images")
    _, target = DetectionDataset(det_set, build_eval_transform(), with_masks=True)[0]
    assert target["masks"].shape == (1, 64, 64)
    np.testing.assert_array_equal(target["boxes"].numpy(), [[10, 10, 30, 30]])
    assert int(target["masks"].sum()) == 400


def test_crowd_ignored_by_evaluation_as_pycocotools_does(crowd_data):
    gt_dict = json.loads((crowd_data / "val.json").read_text())
    det_set = coco_to_detection_set(gt_dict, "val.json", crowd_data / "images")
    masks = np.stack([_box_mask(64, 64, 40, 40, 60, 60), _box_mask(64, 64, 10, 10, 30, 30)]).astype(np.float32)
    pred = {  # the crowd region is detected first, with the higher score
        "boxes": torch.tensor([[40.0, 40, 60, 60], [10, 10, 30, 30]]),
        "scores": torch.tensor([0.95, 0.9]),
        "labels": torch.tensor([1, 1]),
        "masks": torch.from_numpy(masks)[:, None],
    }
    metrics = evaluate_detections(det_set, {7: pred}, ("bbox", "segm"))
    for iou_type in ("bbox", "segm"):
        # the reference: pycocotools on the original file and the same detections
        results = [
            {"image_id": 7, "category_id": 1, "score": float(s), "bbox": [float(b[0]), float(b[1]), 20.0, 20.0],
             "segmentation": _rle(m.astype(np.uint8))}
            for s, b, m in zip(pred["scores"], pred["boxes"], masks)
        ]
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = json.loads(json.dumps(gt_dict))
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(results), iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        assert metrics[iou_type]["AP"] == pytest.approx(float(ev.stats[0]))
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)  # the crowd hit is neither a TP nor an FP


def test_mask_rcnn_trains_and_evaluates_with_a_crowd_region(crowd_data):
    from vision.tasks.training import train

    cfg = load_config(None, _mask_rcnn_overrides(crowd_data, 64))
    summary = train(cfg, crowd_data / "runs" / "mrcnn")
    assert summary["iterations"] == 1
    assert {"bbox", "segm"} <= set(summary["metrics"])


# hundreds of instances ----------------------------------------------------------------------------


@pytest.fixture
def crowded_data(tmp_path) -> Path:
    """A 160x160 image holding a 20x20 grid of 6x6 squares: 400 instances."""
    h = w = 160
    (tmp_path / "images").mkdir()
    img = np.full((h, w, 3), 30, np.uint8)
    anns = []
    for r in range(20):
        for c in range(20):
            x, y = 8 * c + 1, 8 * r + 1
            img[y : y + 6, x : x + 6] = 200
            anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [x, y, 6, 6], "area": 36, "segmentation": _rle(_box_mask(h, w, x, y, x + 6, y + 6))})
    cv2.imwrite(str(tmp_path / "images" / "grid.png"), img)
    coco = {"images": [{"id": 1, "file_name": "grid.png", "width": w, "height": h}],
            "categories": [{"id": 1, "name": "dot"}], "annotations": anns}
    for split in ("train", "val"):
        (tmp_path / f"{split}.json").write_text(json.dumps(coco))
    return tmp_path


def test_400_instances_train_and_predict(crowded_data):
    from vision.data.transforms import build_train_transform

    extra = {
        "model.detections_per_img": "400", "model.score_thresh": "0.0",
        "model.kwargs": "{rpn_post_nms_top_n_train: 1000, rpn_pre_nms_top_n_test: 1000, "
                        "rpn_post_nms_top_n_test: 1000, box_batch_size_per_image: 512}",
        "model.num_classes": "1",
    }
    cfg = load_config(None, _mask_rcnn_overrides(crowded_data, 160, **extra))
    det_set = coco_to_detection_set(json.loads((crowded_data / "train.json").read_text()), "t", crowded_data / "images")
    image, target = DetectionDataset(det_set, build_train_transform(cfg.data.augment), with_masks=True)[0]
    assert target["masks"].shape == (400, 160, 160) and len(target["boxes"]) == 400

    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.train()
    losses = model([image], [target])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()

    model.eval()
    with torch.no_grad():
        (out,) = model([image])
    n = len(out["boxes"])
    assert 100 < n <= 400
    assert out["masks"].shape == (n, 1, 160, 160)
    results = evaluate_detections(det_set, {1: out}, ("segm",), max_dets=400)
    assert np.isfinite(results["segm"]["AP"])


def test_ap_with_more_than_100_detections_per_image():
    """150 objects found exactly: AP is 1 at a 400-detection limit (COCO's 100 would cap recall)."""
    from vision.metrics.coco import evaluate_coco

    boxes = [[10.0 * (k % 15), 10.0 * (k // 15), 8.0, 8.0] for k in range(150)]
    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 160, "height": 160}],
          "categories": [{"id": 1, "name": "dot"}],
          "annotations": [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 64.0, "iscrowd": 0}
                          for k, b in enumerate(boxes)]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": b, "score": 1.0 - k / 1000} for k, b in enumerate(boxes)]
    m400 = evaluate_coco(gt, dets, "bbox", max_dets=400)
    assert m400["bbox"]["AP"] == pytest.approx(1.0) and m400["bbox"]["AP50"] == pytest.approx(1.0)
    assert "maxDets=400 ] = 1.000" in m400["summary"].splitlines()[0]
    m100 = evaluate_coco(gt, dets, "bbox")
    assert m100["bbox"]["AR100"] == pytest.approx(100 / 150)
