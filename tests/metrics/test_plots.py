"""Run and evaluation pictures: the numbers behind them against known answers and pycocotools, the PNGs
written whole, and matplotlib kept out of the commands that never draw."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.recipes import write_tiny_recipe
from vision.metrics import plots
from vision.metrics.confusion import classification_confusion_matrix, detection_confusion_matrix

A, B = 1, 2  # category ids
CATS = [{"id": A, "name": "a"}, {"id": B, "name": "b"}]


def _ann(i: int, image_id: int, cat: int, box: list[float], **kw) -> dict:
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
            **kw}


def _det(image_id: int, cat: int, box: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}


def _png(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path))
    assert image is not None, f"{path} is not a readable PNG"
    return image


def test_detection_confusion_matrix_known_answer():
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": CATS,
        "annotations": [
            _ann(1, 1, A, [0, 0, 10, 10]),    # found as a                     -> [a, a]
            _ann(2, 1, B, [20, 20, 10, 10]),  # found, but as a                -> [b, a]
            _ann(3, 1, A, [50, 50, 10, 10]),  # missed                         -> [a, background]
            _ann(4, 2, B, [0, 0, 20, 20]),    # found as b
            _ann(5, 2, A, [60, 60, 30, 30], iscrowd=1),  # crowd: not an object to find
        ],
    }
    dets = [
        _det(1, A, [0, 0, 10, 10], 0.9),
        _det(1, A, [1, 0, 10, 10], 0.6),     # a duplicate of the first: nothing left to match -> [background, a]
        _det(1, A, [20, 21, 10, 10], 0.8),
        _det(1, B, [80, 0, 10, 10], 0.7),    # on nothing                     -> [background, b]
        _det(1, B, [50, 50, 10, 10], 0.1),   # below the score threshold: ignored, so the object stays missed
        _det(2, B, [0, 0, 20, 19], 0.5),
    ]
    expected = np.array([
        # predicted a, b, background
        [1, 0, 1],  # true a
        [1, 1, 0],  # true b
        [1, 1, 0],  # background
    ])
    np.testing.assert_array_equal(detection_confusion_matrix(gt, dets, iou=0.5, score_thresh=0.25), expected)
    # every object is counted once in its row, every kept detection once in its column
    m = detection_confusion_matrix(gt, dets)
    assert m[:2].sum() == 4 and m[:, :2].sum() == 5


def test_detection_confusion_matrix_matches_in_score_order():
    """The higher-scoring detection takes the object even where a later one overlaps it more."""
    gt = {"images": [{"id": 1}], "categories": CATS, "annotations": [_ann(1, 1, A, [0, 0, 10, 10])]}
    dets = [_det(1, B, [0, 0, 10, 14], 0.9), _det(1, A, [0, 0, 10, 10.5], 0.5)]  # IoU 0.71 and 0.95
    np.testing.assert_array_equal(detection_confusion_matrix(gt, dets), [[0, 1, 0], [0, 0, 0], [1, 0, 0]])
    # below the IoU threshold the object is missed and the detection is a false positive
    np.testing.assert_array_equal(
        detection_confusion_matrix(gt, dets[:1], iou=0.75), [[0, 0, 1], [0, 0, 0], [0, 1, 0]]
    )


def test_classification_confusion_matrix_known_answer():
    m = classification_confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    np.testing.assert_array_equal(m, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])


def _coco_eval(gt: dict, dets: list[dict]):
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    from vision.metrics.coco import _coco_from_dict

    coco_gt = _coco_from_dict(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _random_case(seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for image_id in range(1, 9):
        images.append({"id": image_id, "width": 200, "height": 200, "file_name": f"{image_id}.png"})
        for _ in range(rng.integers(1, 5)):
            x, y, s = (*rng.uniform(0, 150, 2).tolist(), float(rng.uniform(10, 50)))
            cat = int(rng.choice([A, B]))
            anns.append(_ann(len(anns) + 1, image_id, cat, [x, y, s, s]))
            jitter = rng.normal(0, 3, 4)
            dets.append(_det(image_id, cat if rng.random() < 0.8 else A + B - cat,
                             [x + jitter[0], y + jitter[1], s + jitter[2], s + jitter[3]], float(rng.random())))
        dets.append(_det(image_id, int(rng.choice([A, B])), [*rng.uniform(0, 150, 2).tolist(), 20, 20],
                         float(rng.random())))
    return {"images": images, "annotations": anns, "categories": CATS}, dets


def test_pr_curves_average_to_pycocotools_ap(tmp_path):
    gt, dets = _random_case()
    ev = _coco_eval(gt, dets)
    recall, names, p50, pmean = plots.pr_curves(ev)
    assert names == ["a", "b"] and p50.shape == pmean.shape == (2, 101)
    np.testing.assert_allclose(recall, ev.params.recThrs)
    assert p50.mean() == pytest.approx(ev.stats[1], abs=1e-12)  # AP50
    assert pmean.mean() == pytest.approx(ev.stats[0], abs=1e-12)  # AP
    out = plots.plot_pr_curves(ev, tmp_path / "pr.png")
    assert out == tmp_path / "pr.png" and _png(out).shape[:2] == (550, 1300)


def test_pr_curves_leave_out_a_class_without_ground_truth(tmp_path):
    gt, dets = _random_case(1)
    gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] == A]
    _, _, p50, pmean = plots.pr_curves(_coco_eval(gt, dets))
    assert (p50[1] == -1).all() and (pmean[1] == -1).all() and (p50[0] >= 0).all()
    _png(plots.plot_pr_curves(_coco_eval(gt, dets), tmp_path / "pr.png"))


def test_training_curves_from_a_metrics_log(tmp_path):
    log = tmp_path / "run" / "metrics.jsonl"
    log.parent.mkdir()
    lines = [json.dumps({"kind": "train", "iter": i, "epoch": 0, "loss": 2.0 / i, "loss_box_reg": 1.0 / i,
                         "loss_classifier": 1.0 / i, "lr": 0.01 * min(1, i / 5), "grad_norm": 3.0,
                         "images_per_s": 4.0}) for i in range(1, 21)]
    lines.insert(10, json.dumps({"kind": "eval", "iter": 10, "bbox_AP": 0.2, "bbox_AP50": 0.4}))
    lines.append(json.dumps({"kind": "eval", "iter": 20, "bbox_AP": 0.3, "bbox_AP50": 0.5}))
    lines.append('{"kind": "train", "iter": 21, "lo')  # torn by a crash
    log.write_text("\n".join(lines) + "\n")
    records = plots.read_metrics_jsonl(log)
    assert len(records) == 22 and records[-1]["iter"] == 20
    image = _png(plots.plot_training_curves(log, tmp_path / "run" / "curves.png"))
    assert image.shape[:2] == (800, 1200) and image.std() > 10
    assert not list((tmp_path / "run").glob(".curves.png.*"))  # no temporary file left


def test_training_curves_of_an_empty_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("")
    _png(plots.plot_training_curves(log, tmp_path / "curves.png"))


def test_confusion_matrix_plot_checks_its_names(tmp_path):
    out = tmp_path / "cm.png"
    _png(plots.plot_confusion_matrix(np.array([[3, 1, 0], [0, 2, 1], [1, 0, 0]]), ["a", "b"], out))
    before = out.read_bytes()
    with pytest.raises(ValueError, match="3 names"):
        plots.plot_confusion_matrix(np.eye(5), ["a", "b", "c"], out)
    assert out.read_bytes() == before


def test_eval_plots_for_classification_and_semantic_metrics(tmp_path):
    from vision.metrics.eval_plots import write_eval_plots

    cls_metrics = {"top1": 0.5, "confusion_matrix": {"classes": ["x", "y"], "matrix": [[3, 1], [2, 2]]}}
    assert [p.name for p in write_eval_plots(cls_metrics, None, {}, tmp_path)] == ["confusion_matrix.png"]
    sem_metrics = {"mIoU": 0.6, "per_class_iou": {"background": 0.9, "nucleus": 0.3, "other": float("nan")}}
    assert [p.name for p in write_eval_plots(sem_metrics, None, {}, tmp_path)] == ["class_iou.png"]
    for name in ("confusion_matrix.png", "class_iou.png"):
        _png(tmp_path / name)


def test_commands_that_do_not_draw_do_not_import_matplotlib():
    code = (
        "import sys; import vision.cli, vision.commands.predict, vision.commands.train, vision.commands.evaluate, "
        "vision.commands.inspect, vision.inference.predictor, vision.metrics, vision.metrics.eval_plots; "
        "print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_and_eval_write_their_plots(tmp_path, capfd):
    from vision.cli import main as cli
    from vision.data.synthetic import make_synthetic_dataset

    data = tmp_path / "data"
    make_synthetic_dataset(data, num_train=4, num_val=2, image_size=(64, 64), classes=2, max_objects=3,
                           min_object_size=12, seed=3)
    cfg = write_tiny_recipe(tmp_path / "plots.yaml", "plots", data)
    run = tmp_path / "run"
    assert cli(["train", str(cfg), "--output", str(run)]) == 0
    out = capfd.readouterr().out.strip().splitlines()
    assert f"curves -> {run / 'curves.png'}" in out and out[-1].startswith("trained 2 iterations")
    _png(run / "curves.png")
    assert cli(["eval", "--weights", str(run / "best.pt"), "--out", str(tmp_path / "ev" / "metrics.json")]) == 0
    out = capfd.readouterr().out
    for name in ("pr_curves.png", "confusion_matrix.png"):
        assert f"plot -> {tmp_path / 'ev' / name}" in out
        _png(tmp_path / "ev" / name)
