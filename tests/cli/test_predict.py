"""vision predict: bad files, resume, ensembling against the fusion references, CSV, hierarchy, torchrun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2
import ensemble_boxes
import numpy as np
import pytest
import torch

from tests.helpers import PROJECT_ROOT
from vision.cli import main
from vision.data.records import Categories
from vision.ensemble import Hierarchy, fuse_results
from vision.errors import VisionError
from vision.inference.ensemble import FusionSpec, build_predictor, fuse_predictions
from vision.inference.predictor import hierarchy_expander
from vision.inference.runner import run_folder, source_root
from vision.inference.writers import DetectionWriter


def predict_paths(predictor, paths, out, *, root=None, expand=None, categories=None, write_csv=False, **kwargs):
    """The folder runner with the detection writer, as ``vision predict`` runs it."""
    writer = DetectionWriter(predictor.categories, expand=expand, categories_out=categories, write_csv=write_csv)
    root = source_root(root, paths) if root is not None else source_root(paths[0], paths)
    return run_folder(predictor, paths, out, writer, root=root, manifest={"task": "detection"}, **kwargs)



@pytest.fixture(scope="module")
def ckpts(tiny_checkpoint) -> list[str]:
    """Two models with the same classes and a third with other classes, saved as older versions did (no ids)."""
    options = {"spread_scores": True, "with_categories": False,
               "overrides": ("model.max_size=96", "model.detections_per_img=15")}
    return [str(tiny_checkpoint(filename="a.pt", seed=0, names=("cell", "dot"), **options)),
            str(tiny_checkpoint(filename="b.pt", seed=1, names=("cell", "dot"), **options)),
            str(tiny_checkpoint(filename="other.pt", seed=2, names=("x", "y"), **options))]


def _good_images(folder: Path, n: int = 3) -> list[str]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        cv2.imwrite(str(folder / f"img{i}.jpg"), rng.integers(0, 255, (48 + 4 * i, 64, 3), dtype=np.uint8))
        names.append(f"img{i}.jpg")
    return names


def _bad_folder(folder: Path) -> tuple[list[str], list[str]]:
    good = _good_images(folder, 2)
    (folder / "deep").mkdir()
    rng = np.random.default_rng(1)
    cv2.imwrite(str(folder / "deep" / "sixteen.png"), rng.integers(0, 65535, (40, 56, 3), dtype=np.uint16))
    good.append("deep/sixteen.png")
    data = (folder / "img0.jpg").read_bytes()
    (folder / "corrupt.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is text, not an image\n")
    return good, ["corrupt.jpg", "empty.jpg", "notes.jpg"]


def _images(out: Path) -> dict[str, dict]:
    return {im["file_name"]: im for im in json.loads((out / "images.json").read_text())["images"]}


def test_bad_files_are_named_and_every_good_image_predicted(tmp_path, ckpts, capsys) -> None:
    good, bad = _bad_folder(tmp_path / "imgs")
    assert main(["predict", "--weights", ckpts[0], "--source", str(tmp_path / "imgs"), "--out",
                 str(tmp_path / "out"), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    summary = text.strip().splitlines()[-1]
    assert "predicted 3 images" in summary and "3 unreadable" in summary
    for name in bad:
        assert any(line.startswith("skipped") and name in line for line in text.splitlines()), name
    images = _images(tmp_path / "out")
    assert sorted(images) == sorted(good)
    assert (images["deep/sixteen.png"]["width"], images["deep/sixteen.png"]["height"]) == (56, 40)
    dets = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {d["image_id"] for d in dets} == {im["id"] for im in images.values()}


class CountingPredictor:
    """A fixed detection per image, and a record of how many images it was asked for."""

    device = torch.device("cpu")
    categories = Categories((3, 7), ("child", "other"))

    def __init__(self) -> None:
        self.seen = 0

    def predict(self, images):
        self.seen += len(images)
        return [{"boxes": torch.tensor([[2.0, 4.0, 12.0, 20.0]]), "scores": torch.tensor([0.75]),
                 "labels": torch.tensor([1])} for _ in images]


def test_resume_skips_done_images(tmp_path) -> None:
    _good_images(tmp_path / "imgs", 3)
    paths = sorted(str(p) for p in (tmp_path / "imgs").iterdir())
    first = CountingPredictor()
    s1 = predict_paths(first, paths[:2], tmp_path / "out", root=tmp_path / "imgs", num_workers=0, progress=False)
    before = _images(tmp_path / "out")
    second = CountingPredictor()
    s2 = predict_paths(second, paths, tmp_path / "out", root=tmp_path / "imgs", num_workers=0, progress=False)
    assert (s1.done, first.seen) == (2, 2)
    assert (s2.done, s2.resumed, second.seen) == (1, 2, 1)
    after = _images(tmp_path / "out")
    assert sorted(after) == ["img0.jpg", "img1.jpg", "img2.jpg"]
    assert all(after[n] == before[n] for n in before)  # ids kept
    assert len({im["id"] for im in after.values()}) == 3
    dets = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(dets) == 3 and {d["category_id"] for d in dets} == {3}


def test_csv_rows(tmp_path) -> None:
    _good_images(tmp_path / "imgs", 2)
    paths = sorted(str(p) for p in (tmp_path / "imgs").iterdir())
    predict_paths(CountingPredictor(), paths, tmp_path / "out", root=tmp_path / "imgs", num_workers=0,
                  progress=False, write_csv=True)
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["file_name", "class", "score", "x1", "y1", "x2", "y2"],
        ["img0.jpg", "child", "0.75", "2.00", "4.00", "12.00", "20.00"],
        ["img1.jpg", "child", "0.75", "2.00", "4.00", "12.00", "20.00"],
    ]


def test_hierarchy_adds_ancestor_copies(tmp_path) -> None:
    _good_images(tmp_path / "imgs", 1)
    paths = [str(tmp_path / "imgs" / "img0.jpg")]
    pred = CountingPredictor()
    h = Hierarchy({"child": {"parent"}, "parent": {"grandparent"}})
    expand, cats = hierarchy_expander(h, pred.categories)
    predict_paths(pred, paths, tmp_path / "out", num_workers=0, progress=False, expand=expand, categories=cats)
    written = json.loads((tmp_path / "out" / "images.json").read_text())["categories"]
    by_name = {c["name"]: c["id"] for c in written}
    assert by_name["child"] == 3 and by_name["other"] == 7 and {"parent", "grandparent"} <= set(by_name)
    dets = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sorted(d["category_id"] for d in dets) == sorted([3, by_name["parent"], by_name["grandparent"]])
    for d in dets:
        assert d["bbox"] == pytest.approx([2.0, 4.0, 10.0, 16.0]) and d["score"] == pytest.approx(0.75)


def _random_pred(rng, n: int, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    h, w = size
    xy = rng.uniform(0, 0.7, (n, 2))
    wh = rng.uniform(0.05, 0.3, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1) * [w, h, w, h]
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(rng.random(n), dtype=torch.float32),
            "labels": torch.tensor(rng.integers(1, 4, n))}


@pytest.mark.parametrize("method", ["wbf", "nms"])
def test_fuse_predictions_equals_ensemble_boxes(method: str) -> None:
    rng = np.random.default_rng(3)
    size = (60, 90)
    preds = [_random_pred(rng, 40, size) for _ in range(3)]
    # near-duplicates across models so clusters form
    preds[1]["boxes"][:20] = preds[0]["boxes"][:20] + 1.0
    weights = [2.0, 1.0, 1.0]
    scale = np.array([90, 60, 90, 60], dtype=np.float64)
    args = ([p["boxes"].double().numpy() / scale for p in preds], [p["scores"].double().numpy() for p in preds],
            [p["labels"].numpy() for p in preds])
    if method == "wbf":
        rb, rs, rl = ensemble_boxes.weighted_boxes_fusion(*args, weights=weights, iou_thr=0.55)
    else:
        rb, rs, rl = ensemble_boxes.nms(*args, weights=weights, iou_thr=0.5)
    ours = fuse_predictions(preds, size, FusionSpec(method), weights)
    np.testing.assert_allclose(ours["boxes"].numpy(), rb * scale, atol=1e-3)
    np.testing.assert_allclose(ours["scores"].numpy(), rs, atol=1e-6)
    assert ours["labels"].tolist() == rl.astype(int).tolist()


def test_masks_are_score_weighted_means() -> None:
    box = torch.tensor([[10.0, 10.0, 30.0, 30.0]])
    masks = [torch.zeros((1, 1, 40, 40)), torch.zeros((1, 1, 40, 40))]
    masks[0][..., 10:30, 10:30] = 1.0
    masks[1][..., 10:30, 10:20] = 1.0
    preds = [{"boxes": box, "scores": torch.tensor([s]), "labels": torch.tensor([1]), "masks": m}
             for s, m in zip([0.6, 0.2], masks)]
    out = fuse_predictions(preds, (40, 40), FusionSpec("wbf"))
    assert out["masks"].shape == (1, 1, 40, 40)
    assert out["masks"][0, 0, 15, 15] == pytest.approx(1.0)
    assert out["masks"][0, 0, 15, 25] == pytest.approx(0.6 / 0.8)
    assert out["masks"][0, 0, 5, 5] == 0


@pytest.mark.parametrize("method", ["wbf", "soft_nms"])
def test_ensemble_cli_equals_fuse_results_of_single_runs(tmp_path, ckpts, method) -> None:
    _good_images(tmp_path / "imgs", 2)
    src = str(tmp_path / "imgs")
    singles = []
    for i, w in enumerate(ckpts[:2]):
        assert main(["predict", "--weights", w, "--source", src, "--out", str(tmp_path / f"s{i}"), "--workers", "0"]) == 0
        singles.append(json.loads((tmp_path / f"s{i}" / "predictions.json").read_text()))
    assert main(["predict", "--weights", *ckpts[:2], "--source", src, "--out", str(tmp_path / "ens"), "--workers", "0",
                 "--fusion", method, "--model-weights", "2", "1"]) == 0
    ens = json.loads((tmp_path / "ens" / "predictions.json").read_text())
    images = _images(tmp_path / "ens")
    assert _images(tmp_path / "s0") == images
    sizes = {im["id"]: (im["width"], im["height"]) for im in images.values()}
    options = {"decayed_scores": True} if method == "soft_nms" else {}
    ref = fuse_results(singles, sizes, method, weights=[2, 1], **options)
    assert len(ens) == len(ref) > 0
    for a, b in zip(ens, ref):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)


def test_ensemble_needs_same_class_names(ckpts) -> None:
    with pytest.raises(VisionError, match=r"a\.pt and .*other\.pt have different class names"):
        build_predictor([ckpts[0], ckpts[2]], device="cpu")


def test_torchrun_ranks_share_images_and_rank0_merges(tmp_path, ckpts) -> None:
    good = _good_images(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "broken.jpg").write_text("not an image")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vision.cli",
         "predict", "--weights", ckpts[0], "--source", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"),
         "--workers", "0", "--csv"],
        capture_output=True, text=True, env=env, timeout=300, cwd=PROJECT_ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("predicted 5 images") == 1 and "broken.jpg" in proc.stdout
    out = tmp_path / "out"
    logged = {r: [json.loads(line) for line in (out / f"predictions.partial.rank{r}.jsonl").open()] for r in (0, 1)}
    per_rank = [[e["image"]["file_name"] for e in logged[r] if "skipped" not in e] for r in (0, 1)]
    assert [e["image"]["file_name"] for r in (0, 1) for e in logged[r] if "skipped" in e] == ["broken.jpg"]
    assert per_rank[0] and per_rank[1]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(good)  # each image predicted exactly once
    images = json.loads((out / "images.json").read_text())["images"]
    assert sorted(im["file_name"] for im in images) == sorted(good)
    assert len({im["id"] for im in images}) == len(images)
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    dets = json.loads((out / "predictions.json").read_text())
    assert len(rows) == len(dets) and {r[0] for r in rows} == set(good)


def test_tta_cli_predicts_inside_the_image(tmp_path, ckpts) -> None:
    _good_images(tmp_path / "imgs", 1)
    assert main(["predict", "--weights", ckpts[0], "--source", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"),
                 "--workers", "0", "--tta", "--tta-scales", "1.0", "1.5"]) == 0
    dets = json.loads((tmp_path / "out" / "predictions.json").read_text())
    image = _images(tmp_path / "out")["img0.jpg"]
    assert dets and all(d["image_id"] == image["id"] for d in dets)
    for d in dets:
        x, y, w, h = d["bbox"]
        assert x >= -1e-3 and y >= -1e-3 and x + w <= image["width"] + 1e-3 and y + h <= image["height"] + 1e-3
        assert d["category_id"] in (1, 2) and 0 < d["score"] <= 1


def test_engine_and_plain_cli_runs_agree(tmp_path, ckpts) -> None:
    """``vision predict`` runs the inference engine by default; ``--plain`` the model as trained."""
    _good_images(tmp_path / "imgs", 2)
    runs = {}
    for flag in ([], ["--plain"]):
        out = tmp_path / ("plain" if flag else "engine")
        assert main(["predict", "--weights", ckpts[0], "--source", str(tmp_path / "imgs"), "--out", str(out),
                     "--workers", "0", *flag]) == 0
        runs["plain" if flag else "engine"] = json.loads((out / "predictions.json").read_text())
    fast, plain = runs["engine"], runs["plain"]
    assert len(fast) == len(plain) > 0
    for a, b in zip(sorted(fast, key=lambda d: (d["image_id"], -d["score"])),
                    sorted(plain, key=lambda d: (d["image_id"], -d["score"]))):
        assert a["image_id"] == b["image_id"] and abs(a["score"] - b["score"]) < 1e-3
