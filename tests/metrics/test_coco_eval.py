"""vision's evaluation against pycocotools run directly on the same pair of files."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vision.cli import main
from vision.data.coco import read_coco
from vision.data.records import Categories
from vision.metrics.coco import STAT_NAMES, evaluate_coco, evaluate_detections, prediction_to_results


def _random_set(seed=0, num_images=12):
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": 3, "name": "a"}, {"id": 8, "name": "b"}]}
    dets = []
    for i in range(1, num_images + 1):
        gt["images"].append({"id": i, "file_name": f"{i}.jpg", "width": 300, "height": 200})
        for _ in range(rng.integers(1, 6)):
            x, y = rng.uniform(0, 200), rng.uniform(0, 120)
            w, h = rng.uniform(5, 90), rng.uniform(5, 70)
            cat = int(rng.choice([3, 8]))
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": cat,
                                      "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            if rng.random() < 0.8:
                j = rng.normal(0, 4, 4)
                dets.append({"image_id": i, "category_id": cat if rng.random() < 0.9 else 11 - cat,
                             "bbox": [x + j[0], y + j[1], max(1, w + j[2]), max(1, h + j[3])],
                             "score": float(rng.random())})
        dets.append({"image_id": i, "category_id": 3, "bbox": [10, 10, 20, 20], "score": 0.3})
    return gt, dets


def _pycocotools_stats(gt, dets, iou_type="bbox"):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(json.loads(json.dumps(dets))), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_stats_and_per_class_equal_pycocotools():
    gt, dets = _random_set()
    ours = evaluate_coco(gt, dets)
    ref = _pycocotools_stats(gt, dets)
    np.testing.assert_allclose([ours["bbox"][k] for k in STAT_NAMES], ref.stats, atol=1e-12)
    assert 0.1 < ours["bbox"]["AP"] < 0.95  # a real mix of hits and misses
    for k, name in enumerate(["a", "b"]):
        p = ref.eval["precision"][:, :, k, 0, -1]
        assert ours["per_class"][name] == pytest.approx(p[p > -1].mean())


def test_eval_dets_cli_writes_the_documented_json(tmp_path, capsys):
    gt, dets = _random_set(1)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    assert main(["eval-dets", "--gt", str(tmp_path / "gt.json"), "--dets", str(tmp_path / "dets.json"),
                 "--out", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in printed
    assert printed.count("-1.000: the ground truth has no objects in that area range") == 1  # no large boxes
    out = json.loads((tmp_path / "m.json").read_text())
    assert list(out) == ["bbox", "per_class"] and list(out["bbox"]) == list(STAT_NAMES)
    np.testing.assert_allclose(list(out["bbox"].values()), _pycocotools_stats(gt, dets).stats, atol=1e-12)


def test_results_naming_unknown_images_are_an_error(tmp_path, capsys):
    gt, dets = _random_set(2, num_images=3)
    dets += [{"image_id": 77, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5},
             {"image_id": 78, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    assert main(["eval-dets", "--gt", str(tmp_path / "gt.json"), "--dets", str(tmp_path / "dets.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'dets.json'}: image ids not in the ground truth: 77, 78"


def test_segm_evaluation_equals_pycocotools():
    from pycocotools import mask as mask_utils

    gt = {"images": [{"id": 1, "file_name": "1.png", "width": 40, "height": 30}],
          "categories": [{"id": 1, "name": "blob"}], "annotations": []}
    dets = []
    rng = np.random.default_rng(3)
    for k in range(4):
        m = np.zeros((30, 40), np.uint8)
        x, y = 2 + 9 * k, 5
        m[y:y + 12, x:x + 7] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode()
        gt["annotations"].append({"id": k + 1, "image_id": 1, "category_id": 1, "segmentation": rle,
                                  "area": float(m.sum()), "bbox": [x, y, 7, 12], "iscrowd": 0})
        d = np.roll(m, int(rng.integers(-3, 4)), axis=0)
        drle = mask_utils.encode(np.asfortranarray(d))
        drle["counts"] = drle["counts"].decode()
        dets.append({"image_id": 1, "category_id": 1, "segmentation": drle, "score": 0.9 - 0.1 * k})
    ours = evaluate_coco(gt, dets, "segm")
    np.testing.assert_allclose([ours["segm"][k] for k in STAT_NAMES], _pycocotools_stats(gt, dets, "segm").stats)


def test_gt_as_detections_scores_one_and_predictions_map_back_to_dataset_ids(tmp_path):
    gt, _ = _random_set(4, num_images=5)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    ds = read_coco(tmp_path / "gt.json")
    predictions = {r.image_id: {"boxes": r.boxes, "scores": np.ones(len(r)), "labels": r.labels} for r in ds.records}
    metrics = evaluate_detections(ds, predictions)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    results = prediction_to_results(1, predictions[1], Categories((3, 8), ("a", "b")))
    assert {r["category_id"] for r in results} <= {3, 8}


def test_reference_numbers_of_the_official_cocoapi(shared_data, tmp_path):
    ref = shared_data / "coco_eval_ref"
    expected = json.loads((ref / "expected.json").read_text())
    assert main(["eval-dets", "--gt", str(ref / "gt.json"), "--dets", str(ref / "dets.json"),
                 "--out", str(tmp_path / "m.json")]) == 0
    got = json.loads((tmp_path / "m.json").read_text())["bbox"]
    np.testing.assert_allclose(list(got.values()), expected["stats"], atol=expected["tolerance"])


def test_no_detections_score_zero_where_there_are_objects_as_pycocotools_scores_useless_ones():
    """pycocotools cannot load an empty results list; nothing found scores what a useless detection
    does there (AP and AR 0), and an area range without objects stays -1 as COCOeval has it."""
    gt, _ = _random_set(2)
    useless = [{"image_id": 1, "category_id": 3, "bbox": [290, 190, 5, 5], "score": 0.01}]
    ref = _pycocotools_stats(gt, useless)
    ours = evaluate_coco(gt, [])
    np.testing.assert_allclose([ours["bbox"][k] for k in STAT_NAMES], ref.stats, atol=1e-12)
    assert ours["bbox"]["AP"] == 0.0 and ours["per_class"] == {"a": 0.0, "b": 0.0}
    assert -1.0 in ref.stats  # the set has no large objects: that column is undefined on both sides


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("score", float("nan"), "score nan is not a finite number"),
        ("score", "high", "score 'high' is not a finite number"),
        ("bbox", [1.0, 2.0, float("nan"), 4.0], "bbox must be 4 finite numbers"),
        ("bbox", [1.0, 2.0, -3.0, 4.0], "negative width or height"),
    ],
)
def test_results_that_cannot_be_scored_are_refused_with_their_entry(field, value, message, tmp_path, capsys):
    """A NaN detection would be ranked and matched by pycocotools (and could raise AP): refuse it."""
    gt, dets = _random_set(3)
    dets[5] = {**dets[5], field: value}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets).replace("NaN", "NaN"))
    assert main(["eval-dets", "--gt", str(tmp_path / "gt.json"), "--dets", str(tmp_path / "dets.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "entry 5" in err and message in err
