"""The Python API against the command line: the same checkpoint and images give the same answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import vision
from tests.helpers import PROJECT_ROOT
from tests.helpers.images import write_random_images
from vision.cli import main
from vision.errors import VisionError


@pytest.fixture(scope="module")
def detector(tiny_checkpoint) -> Path:
    """A RetinaNet whose scores are spread (an untrained head ties them all), with gapped category ids."""
    return tiny_checkpoint(names=("cell", "dot"), ids=(3, 7), spread_scores=True,
                           overrides=("model.max_size=96", "model.detections_per_img=20"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("imgs")
    write_random_images(d, [(48, 64), (60, 52), (40, 72)])
    return d


def _cli_predictions(detector: Path, folder: Path, out: Path) -> dict[str, list[dict]]:
    assert main(["predict", "--weights", str(detector), "--source", str(folder), "--out", str(out),
                 "--workers", "0"]) == 0
    names = {im["id"]: im["file_name"] for im in json.loads((out / "images.json").read_text())["images"]}
    by_name: dict[str, list[dict]] = {n: [] for n in names.values()}
    for r in json.loads((out / "predictions.json").read_text()):
        by_name[names[r["image_id"]]].append(r)
    return by_name


def _assert_same(result, expected: list[dict]) -> None:
    order = np.argsort(-result.scores, kind="stable")
    exp = sorted(expected, key=lambda r: -r["score"])
    assert len(result.scores) == len(exp) > 0
    got_boxes = result.boxes[order]
    exp_boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in exp)])
    np.testing.assert_allclose(got_boxes, exp_boxes, atol=0.05)
    np.testing.assert_allclose(result.scores[order], [r["score"] for r in exp], atol=1e-3)
    assert result.labels[order].tolist() == [r["category_id"] for r in exp]


def test_predict_paths_arrays_and_pil_images_give_what_vision_predict_writes(detector, folder, tmp_path):
    expected = _cli_predictions(detector, folder, tmp_path / "out")
    model = vision.load(detector, device="cpu")
    assert model.names == ["cell", "dot"] and model.task.name == "detection"
    paths = sorted(str(p) for p in folder.iterdir())
    results = model.predict(paths, workers=0)
    assert [Path(r.path).name for r in results] == [Path(p).name for p in paths]
    for r in results:
        _assert_same(r, expected[Path(r.path).name])
        assert set(r.labels.tolist()) <= {3, 7}, "labels are the data set's category ids"
        assert r.names == [{3: "cell", 7: "dot"}[int(k)] for k in r.labels]
    arrays = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in paths]
    for path, r in zip(paths, model.predict(arrays)):
        _assert_same(r, expected[Path(path).name])
    single = model.predict(Image.open(paths[1]))
    assert len(single) == 1
    _assert_same(single[0], expected[Path(paths[1]).name])
    # a folder, streamed
    stream = model.predict(str(folder), stream=True, workers=0)
    assert not isinstance(stream, list)
    assert [Path(r.path).name for r in stream] == [Path(p).name for p in paths]


def test_result_to_coco_and_draw(detector, folder):
    model = vision.load(detector, device="cpu")
    r = model.predict(str(folder / "img0.png"))[0]
    coco = r.to_coco(image_id=5)
    assert len(coco) == len(r.scores) and {c["image_id"] for c in coco} == {5}
    assert {c["category_id"] for c in coco} <= {3, 7}
    x, y, w, h = coco[0]["bbox"]
    np.testing.assert_allclose([x, y, x + w, y + h], r.boxes[0], atol=1e-4)
    drawn = r.draw(score_thresh=0.0)
    assert drawn.shape == (48, 64, 3) and drawn.dtype == np.uint8 and not np.array_equal(drawn, r.image)
    # by default only detections scoring 0.5 or more are drawn (the results keep them all)
    above = r.scores >= 0.5
    assert np.array_equal(r.draw(), r.draw(score_thresh=0.5))
    assert np.array_equal(r.draw(), r.image) == (not above.any())


def test_three_lines_in_a_fresh_interpreter(detector, folder):
    """What a notebook user types; ``import vision`` alone does not import torch."""
    code = (
        "import sys, vision; assert 'torch' not in sys.modules\n"
        f"model = vision.load({str(detector)!r})\n"
        f"r = model.predict({str(folder / 'img1.png')!r})[0]\n"
        "print(type(r).__name__, r.boxes.shape[1], sorted(set(r.labels.tolist()) - {3, 7}), r.shape)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(PROJECT_ROOT))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "Result 4 [] (60, 52)"


def test_bad_inputs_are_one_line_errors(detector, tiny_checkpoint, tmp_path):
    model = vision.load(detector, device="cpu")
    with pytest.raises(VisionError, match="no images found"):
        model.predict(str(tmp_path / "nothing_here"))
    with pytest.raises(VisionError, match=r"expected an HxWx3 RGB array, got shape \(4, 5, 6, 7\)"):
        model.predict(np.zeros((4, 5, 6, 7), np.uint8))
    classifier = tiny_checkpoint("classifier")
    with pytest.raises(VisionError, match="ensembling is for detectors"):
        vision.load([classifier, classifier], device="cpu")


def test_train_and_evaluate_from_python(tmp_path):
    from vision.data.synthetic import make_synthetic_dataset

    data = tmp_path / "data"
    make_synthetic_dataset(data, num_train=4, num_val=2, image_size=(64, 64), classes=2, max_objects=2,
                           min_object_size=12, seed=4)
    overrides = [
        "model.arch=retinanet", "model.backbone=test_resnet", "model.fpn_channels=16", "model.min_size=[64]",
        "model.max_size=64", "model.anchor_sizes=[[8],[16],[32],[48],[64]]", "model.aspect_ratios=[1.0]",
        f"data.root={data}", "data.train={ann: train.json, images: images}",
        "data.val={ann: val.json, images: images}", "data.num_workers=0", "train.device=cpu", "train.epochs=1",
        "train.warmup_iters=1", "name=api",
    ]
    run_dir = vision.train(None, overrides, output=tmp_path / "run")
    assert run_dir == tmp_path / "run"
    assert {"best.pt", "last.pt", "config.yaml", "metrics.jsonl", "curves.png"} <= {p.name for p in run_dir.iterdir()}
    metrics = vision.evaluate(run_dir / "best.pt", out=tmp_path / "m.json")
    assert set(metrics["bbox"]) >= {"AP", "AP50"} and json.loads((tmp_path / "m.json").read_text())["num_images"] == 2
    model = vision.load(run_dir / "best.pt")
    assert model.categories.ids == (1, 3)  # the synthetic set's ids, from the checkpoint
