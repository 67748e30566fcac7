"""``vision demo`` end to end at toy size: both recipes train, predict, draw and are scored; summary.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import CONFIGS
from vision.cli import main as cli
from vision.config import load_config
from vision.data.coco import load_json
from vision.metrics.coco import evaluate_coco
from vision.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TINY = [
    "--num-train", "4", "--num-val", "3", "--size", "64", "48", "--object-size", "16", "28",
    "model.backbone=test_resnet", "model.fpn_channels=16", "train.max_iters=2", "train.device=cpu",
    "data.num_workers=0", "data.batch_size=2",
]


@pytest.mark.parametrize("name", ["demo_retinanet.yaml", "demo_mask_rcnn.yaml"])
def test_demo_recipes_build_their_models(name: str) -> None:
    cfg = load_config(CONFIGS / name, ["model.num_classes=3"])
    assert cfg.train.time_budget_min and cfg.train.max_iters  # capped in time and in iterations
    build_model(cfg.model)  # anchors fit the pyramid, kwargs are torchvision's


def test_demo_writes_summary_predictions_and_pictures(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert cli(["demo", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seconds"] > 0
    models = summary["models"]
    assert [(m["name"], m["arch"]) for m in models] == [("demo_retinanet", "retinanet"), ("demo_mask_rcnn", "mask_rcnn")]
    gt = load_json(out / "data" / "val.json")
    for m in models:
        assert Path(m["run_dir"], "last.pt").is_file() and m["iterations"] == 2
        masks = m["arch"] == "mask_rcnn"
        expected = {"box_AP", "box_AP50"} | ({"mask_AP", "mask_AP50"} if masks else set())
        assert set(m["metrics"]) == expected
        # the figures are pycocotools' on the folder predictions written beside them
        images = {im["id"]: im["file_name"] for im in load_json(Path(m["predictions"]).parent / "images.json")["images"]}
        gt_ids = {im["file_name"]: im["id"] for im in gt["images"]}
        results = [{**r, "image_id": gt_ids[images[r["image_id"]]]} for r in load_json(m["predictions"])]
        for iou_type, prefix in (("bbox", "box"), ("segm", "mask")) if masks else (("bbox", "box"),):
            ref = evaluate_coco(gt, results, iou_type)[iou_type]
            assert m["metrics"][f"{prefix}_AP50"] == pytest.approx(ref["AP50"], abs=1e-4)
        pictures = sorted(Path(m["pictures"]).glob("*.png"))
        assert len(pictures) == 3 and m["pictures"] in printed
    assert str(out / "summary.json") in printed


def test_demo_mask_minutes_zero_skips_mask_rcnn(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    assert cli(["demo", "--out", str(out), "--mask-minutes", "0", *TINY]) == 0
    assert [m["arch"] for m in json.loads((out / "summary.json").read_text())["models"]] == ["retinanet"]
