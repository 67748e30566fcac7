"""The data set's own category ids, from training data to every output: train -> checkpoint ->
predict / eval-dets / export, on data whose ids are not 1..K (gaps, a Roboflow-style placeholder 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.recipes import write_tiny_recipe
from vision.cli import main as cli
from vision.data.synthetic import make_synthetic_dataset
from vision.engine.checkpoint import atomic_save, load_checkpoint_file


def _with_placeholder(path: Path) -> None:
    """A Roboflow export: category 0 names the data set and has no annotations, classes count from 1."""
    data = json.loads(path.read_text())
    remap = {c["id"]: k + 1 for k, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    data["categories"] = [{"id": 0, "name": "shapes", "supercategory": "none"}] + [
        {**c, "id": remap[c["id"]], "supercategory": "shapes"} for c in data["categories"]
    ]
    for a in data["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    path.write_text(json.dumps(data))


def _train(tmp: Path, placeholder: bool) -> dict[str, Path]:
    data = tmp / "data"
    info = make_synthetic_dataset(data, num_train=6, num_val=4, image_size=(64, 64), classes=2, max_objects=3,
                                  min_object_size=12, seed=3)
    if placeholder:
        _with_placeholder(Path(info["train"]))
        _with_placeholder(Path(info["val"]))
    cfg = write_tiny_recipe(tmp / "ids.yaml", "ids", data, epochs=2)
    run = tmp / "run"
    assert cli(["train", str(cfg), "--output", str(run)]) == 0
    return {"data": data, "val": Path(info["val"]), "run": run, "cfg": cfg}


@pytest.fixture(scope="module")
def gapped(tmp_path_factory) -> dict[str, Path]:
    """Synthetic ids 1, 3 (circle, square)."""
    return _train(tmp_path_factory.mktemp("gapped"), placeholder=False)


@pytest.fixture(scope="module")
def placeholder(tmp_path_factory) -> dict[str, Path]:
    """Ids 0 (placeholder, never annotated), 1, 2."""
    return _train(tmp_path_factory.mktemp("placeholder"), placeholder=True)


def _val_images(val_json: Path, data: Path, out: Path) -> Path:
    """A list file of the validation images (the images folder holds the training images too)."""
    names = [img["file_name"] for img in json.loads(val_json.read_text())["images"]]
    out.write_text("".join(f"{data / 'images' / n}\n" for n in names))
    return out


@pytest.mark.parametrize("which", ["gapped", "placeholder"])
def test_checkpoint_and_predictions_keep_the_data_sets_ids(which, request, tmp_path):
    run = request.getfixturevalue(which)
    gt_cats = [{"id": c["id"], "name": c["name"]} for c in json.loads(run["val"].read_text())["categories"]]
    for name in ("best.pt", "last.pt"):
        cats = load_checkpoint_file(run["run"] / name)["categories"]
        assert [{"id": i, "name": n} for i, n in zip(cats["ids"], cats["names"])] == gt_cats
    out = tmp_path / "pred"
    assert cli(["predict", "--weights", str(run["run"] / "best.pt"), "--source", str(run["data"] / "images"),
                "--out", str(out), "--workers", "0"]) == 0
    images = json.loads((out / "images.json").read_text())
    assert [{"id": c["id"], "name": c["name"]} for c in images["categories"]] == gt_cats
    preds = json.loads((out / "predictions.json").read_text())
    assert preds, "score_thresh 0: every image has detections"
    assert {p["category_id"] for p in preds} <= {c["id"] for c in gt_cats}
    if which == "gapped":  # ids 1 and 3: the second class's detections must say 3, never 2
        assert 3 in {p["category_id"] for p in preds} and 2 not in {p["category_id"] for p in preds}


@pytest.mark.parametrize("which", ["gapped", "placeholder"])
def test_eval_dets_scores_predict_output_as_vision_eval_scores_the_checkpoint(which, request, tmp_path, capfd):
    run = request.getfixturevalue(which)
    best = run["run"] / "best.pt"
    assert cli(["eval", "--weights", str(best), "--out", str(tmp_path / "eval.json")]) == 0
    expected = json.loads((tmp_path / "eval.json").read_text())["bbox"]
    out = tmp_path / "pred"
    # the whole images folder: the training images in it are not in val.json and are left out
    assert cli(["predict", "--weights", str(best), "--source", str(run["data"] / "images"), "--out", str(out),
                "--workers", "0"]) == 0
    capfd.readouterr()
    assert cli(["eval-dets", "--gt", str(run["val"]), "--dets", str(out / "predictions.json"),
                "--out", str(tmp_path / "dets.json")]) == 0
    printed = capfd.readouterr().out
    assert "matched 4 images by file name" in printed and "6 predicted images not in the ground truth" in printed
    got = json.loads((tmp_path / "dets.json").read_text())["bbox"]
    assert got["AP50"] == pytest.approx(expected["AP50"], abs=0.002)
    assert got["AP"] == pytest.approx(expected["AP"], abs=0.002)


def test_eval_dets_matches_a_subset_and_names_with_folders(gapped, tmp_path, capfd):
    """Ground-truth names with a folder in front, and only some images predicted: those are evaluated."""
    best = gapped["run"] / "best.pt"
    gt = json.loads(gapped["val"].read_text())
    for img in gt["images"]:
        img["file_name"] = f"images/{img['file_name']}"
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    listed = _val_images(gapped["val"], gapped["data"], tmp_path / "val.txt")
    first_two = tmp_path / "two.txt"
    first_two.write_text("".join(listed.read_text().splitlines(keepends=True)[:2]))
    out = tmp_path / "pred"
    assert cli(["predict", "--weights", str(best), "--source", str(first_two), "--out", str(out),
                "--workers", "0"]) == 0
    capfd.readouterr()
    assert cli(["eval-dets", "--gt", str(gt_path), "--dets", str(out / "predictions.json")]) == 0
    printed = capfd.readouterr().out
    assert "matched 2 images by file name" in printed and "evaluated on those 2 of the ground truth's 4" in printed


def test_eval_dets_without_images_json_needs_ground_truth_ids(gapped, tmp_path, capfd):
    out = tmp_path / "pred"
    assert cli(["predict", "--weights", str(gapped["run"] / "best.pt"), "--source",
                str(_val_images(gapped["val"], gapped["data"], tmp_path / "val.txt")), "--out", str(out),
                "--workers", "0"]) == 0
    moved = tmp_path / "elsewhere.json"
    (out / "predictions.json").rename(moved)
    capfd.readouterr()
    # predict numbers images 1..4; val.json's ids differ, so without images.json the ids cannot be trusted
    gt = json.loads(gapped["val"].read_text())
    if {img["id"] for img in gt["images"]} != {1, 2, 3, 4}:
        assert cli(["eval-dets", "--gt", str(gapped["val"]), "--dets", str(moved)]) == 2
    assert cli(["eval-dets", "--gt", str(gapped["val"]), "--dets", str(moved),
                "--images", str(out / "images.json")]) == 0
    assert "matched 4 images by file name" in capfd.readouterr().out


def test_export_label_file_keeps_the_ids(gapped, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "model.torchscript.pt"
    assert cli(["export", "--weights", str(gapped["run"] / "best.pt"), "--format", "torchscript",
                "--out", str(out)]) == 0
    labels = json.loads(out.with_suffix(".json").read_text())["labels"]
    assert labels == {"1": {"id": 1, "name": "circle"}, "2": {"id": 3, "name": "square"}}


def test_older_checkpoint_without_categories_assumes_1_to_k_and_says_so(gapped, tmp_path, caplog):
    ckpt = load_checkpoint_file(gapped["run"] / "best.pt")
    del ckpt["categories"]
    old = tmp_path / "old.pt"
    atomic_save(ckpt, old)
    out = tmp_path / "pred"
    assert cli(["predict", "--weights", str(old), "--source", str(gapped["data"] / "images"), "--out", str(out),
                "--workers", "0"]) == 0
    assert any("ids 1..2 are assumed" in r.getMessage() for r in caplog.records)
    cats = json.loads((out / "images.json").read_text())["categories"]
    assert [(c["id"], c["name"]) for c in cats] == [(1, "circle"), (2, "square")]
