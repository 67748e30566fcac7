"""``vision fuse`` and ``vision expand`` on small files, checked against ensemble-boxes and by hand."""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings

import ensemble_boxes as eb
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from vision.cli import main

IMAGES = {
    "images": [{"id": 1, "width": 200, "height": 100}, {"id": 2, "width": 64, "height": 64},
               {"id": 3, "width": 50, "height": 50}],
    "categories": [{"id": 3, "name": "Man"}, {"id": 7, "name": "Woman"}, {"id": 90, "name": "Person"}],
}
A = [
    {"image_id": 1, "category_id": 3, "bbox": [20, 10, 40, 30], "score": 0.9},
    {"image_id": 1, "category_id": 7, "bbox": [100, 50, 50, 40], "score": 0.4},
    {"image_id": 2, "category_id": 90, "bbox": [0, 0, 30, 30], "score": 0.5},
]
B = [
    {"image_id": 1, "category_id": 3, "bbox": [24, 12, 40, 30], "score": 0.7},
    {"image_id": 1, "category_id": 7, "bbox": [102, 50, 48, 40], "score": 0.8},
    {"image_id": 2, "category_id": 90, "bbox": [40, 40, 10, 10], "score": 0.05},
]


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, data in (("images", IMAGES), ("a", A), ("b", B)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    return tmp_path, paths


def reference(method, weights, iou, skip):
    """ensemble-boxes on the same detections, image by image, back in pixels."""
    out = []
    sizes = {im["id"]: (im["width"], im["height"]) for im in IMAGES["images"]}
    for image_id, (w, h) in sizes.items():
        boxes, scores, labels = [], [], []
        for dets in (A, B):
            d = [x for x in dets if x["image_id"] == image_id and x["score"] >= skip]
            boxes.append(np.array([[x["bbox"][0] / w, x["bbox"][1] / h, (x["bbox"][0] + x["bbox"][2]) / w,
                                    (x["bbox"][1] + x["bbox"][3]) / h] for x in d]).reshape(-1, 4))
            scores.append(np.array([x["score"] for x in d]))
            labels.append(np.array([x["category_id"] for x in d]))
        if sum(len(s) for s in scores) == 0:
            continue
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if method == "wbf":
                r = eb.weighted_boxes_fusion(boxes, scores, labels, weights=weights, iou_thr=iou, skip_box_thr=skip)
            elif method == "nms":
                r = eb.nms(boxes, scores, labels, weights=weights, iou_thr=iou)
            else:
                r = eb.soft_nms(boxes, scores, labels, weights=weights, iou_thr=iou)
        for b, s, lab in zip(*r):
            out.append((image_id, int(lab), round(float(s), 6),
                        tuple(round(v, 4) for v in (b[0] * w, b[1] * h, (b[2] - b[0]) * w, (b[3] - b[1]) * h))))
    return sorted(out)


@pytest.mark.parametrize("method", ["wbf", "nms", "soft_nms"])
def test_fuse_matches_ensemble_boxes(files, method, capsys):
    tmp, p = files
    out = tmp / "fused.json"
    args = ["fuse", "--dets", str(p["a"]), str(p["b"]), "--images", str(p["images"]), "--out", str(out),
            "--method", method, "--model-weights", "2", "1", "--iou", "0.5", "--skip-score", "0.1",
            "--soft-scores", "original"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    got = sorted((d["image_id"], d["category_id"], round(d["score"], 6), tuple(round(v, 4) for v in d["bbox"]))
                 for d in json.loads(out.read_text()))
    assert got == reference(method, [2, 1], 0.5, 0.1)
    assert {d["category_id"] for d in json.loads(out.read_text())} <= {3, 7, 90}  # ids kept as in the files


def test_fuse_score_sum_hand_example(files):
    tmp, p = files
    out = tmp / "sum.json"
    assert main(["fuse", "--dets", str(p["a"]), str(p["b"]), "--images", str(p["images"]), "--out", str(out),
                 "--method", "sum", "--iou", "0.5"]) == 0
    got = {(d["image_id"], d["category_id"], round(d["score"], 6)) for d in json.loads(out.read_text())}
    # Man: 0.9 and 0.7 overlap (IoU 0.72) -> (0.9 + 0.7) / 2; Woman: 0.8 kept, 0.4 added -> 0.6.
    assert got == {(1, 3, 0.8), (1, 7, 0.6), (2, 90, 0.25), (2, 90, 0.025)}


def test_fuse_masks_through_cli(tmp_path):
    images = {"images": [{"id": 1, "width": 4, "height": 4}], "categories": [{"id": 1, "name": "cell"}]}
    m1 = np.zeros((4, 4), np.uint8)
    m1[0:2, 0:4] = 1
    m2 = np.zeros((4, 4), np.uint8)
    m2[0:4, 0:2] = 1

    def rle(m):
        r = mask_utils.encode(np.asfortranarray(m))
        r["counts"] = r["counts"].decode()
        return r

    a = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.6, "segmentation": rle(m1)}]
    b = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.4, "segmentation": rle(m2)}]
    for name, data in (("images", images), ("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    out = tmp_path / "f.json"
    assert main(["fuse", "--dets", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--images", str(tmp_path / "images.json"), "--out", str(out)]) == 0
    (det,) = json.loads(out.read_text())
    seg = det["segmentation"]
    seg["counts"] = seg["counts"].encode()
    # Mean 0.6*m1 + 0.4*m2 >= 0.5 wherever m1 is set (0.6 or 1.0), nowhere else (0.4 or 0).
    np.testing.assert_array_equal(mask_utils.decode(seg), m1)


def test_fuse_bad_inputs(files, capsys):
    tmp, p = files
    base = ["fuse", "--images", str(p["images"]), "--out", str(tmp / "x.json"), "--dets", str(p["a"])]
    assert main([*base, str(tmp / "missing.json")]) == 2
    assert "missing.json: detections file not found" in capsys.readouterr().err
    (tmp / "bad.json").write_text('[{"image_id": 1,')
    assert main([*base, str(tmp / "bad.json")]) == 2
    assert "bad.json: not valid JSON" in capsys.readouterr().err
    (tmp / "c.json").write_text(json.dumps([{"image_id": 42, "category_id": 3, "bbox": [1, 1, 2, 2], "score": 0.3}]))
    assert main([*base, str(tmp / "c.json")]) == 2
    err = capsys.readouterr().err
    assert "c.json: detection 0: image id 42 is not in" in err and "images.json" in err
    (tmp / "d.json").write_text(json.dumps([{"image_id": 1, "bbox": [1, 1, 2, 2], "score": 0.3}]))
    assert main([*base, str(tmp / "d.json")]) == 2
    assert "d.json: detection 0: missing 'category_id'" in capsys.readouterr().err
    assert main([*base, str(p["b"]), "--model-weights", "1"]) == 2
    assert "--model-weights" in capsys.readouterr().err
    assert not (tmp / "x.json").exists()


def test_expand_cli(files, capsys):
    tmp, p = files
    (tmp / "h.json").write_text(json.dumps({"Man": ["Person"], "Woman": ["Person"], "Person": ["Mammal"]}))
    out = tmp / "e.json"
    assert main(["expand", "--dets", str(p["a"]), "--images", str(p["images"]), "--hierarchy", str(tmp / "h.json"),
                 "--out", str(out), "--merge", "none"]) == 0
    assert "wrote" in capsys.readouterr().out
    got = sorted((d["image_id"], d["category_id"], d["score"]) for d in json.loads(out.read_text()))
    # Mammal is not among the categories: it is added with the next id (91) and listed beside the output.
    assert got == sorted([(1, 3, 0.9), (1, 90, 0.9), (1, 91, 0.9), (1, 7, 0.4), (1, 90, 0.4), (1, 91, 0.4),
                          (2, 90, 0.5), (2, 91, 0.5)])
    cats = json.loads((tmp / "e.categories.json").read_text())
    assert cats[-1] == {"id": 91, "name": "Mammal", "supercategory": "hierarchy"}
    (tmp / "far.json").write_text(json.dumps([{"image_id": 9, "category_id": 3, "bbox": [1, 1, 2, 2], "score": 1}]))
    assert main(["expand", "--dets", str(tmp / "far.json"), "--images", str(p["images"]),
                 "--hierarchy", str(tmp / "h.json"), "--out", str(out)]) == 2
    assert "far.json: image id 9 is not in" in capsys.readouterr().err


def test_fuse_with_hierarchy(files):
    tmp, p = files
    (tmp / "h.json").write_text(json.dumps({"Man": ["Person"], "Woman": ["Person"]}))
    out = tmp / "fh.json"
    assert main(["fuse", "--dets", str(p["a"]), str(p["b"]), "--images", str(p["images"]), "--out", str(out),
                 "--method", "nms", "--hierarchy", str(tmp / "h.json")]) == 0
    dets = json.loads(out.read_text())
    # Image 1: Man (0.9 vs 0.7, IoU 0.72) -> one Man; Woman -> one Woman; their Person copies do not overlap.
    person = sorted(round(d["score"], 6) for d in dets if d["image_id"] == 1 and d["category_id"] == 90)
    assert person == [0.8, 0.9]


def _strict_json(path):
    """Parse as strict JSON: NaN / Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} in {path}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_fuse_is_bit_exact_against_ensemble_boxes(tmp_path, capsys):
    """Many images, three models, full-precision pixel boxes: every fused score and box equals, bit for bit,
    what ensemble-boxes' WBF gives on the same normalised boxes converted back to pixels."""
    rng = np.random.default_rng(7)
    images = [{"id": i + 10, "width": int(rng.integers(50, 900)), "height": int(rng.integers(50, 900))}
              for i in range(12)]
    models = []
    for _ in range(3):
        dets = []
        for im in images[:-1]:  # the last image has no detections at all
            n = int(rng.integers(0, 40))
            xy = rng.random((n, 2)) * [im["width"], im["height"]]
            wh = rng.random((n, 2)) * [im["width"], im["height"]] / 3
            for k in range(n):
                dets.append({"image_id": im["id"], "category_id": int(rng.integers(1, 4)),
                             "bbox": [*xy[k].tolist(), *wh[k].tolist()], "score": float(rng.random())})
        models.append(dets)
    paths = []
    for t, dets in enumerate(models):
        paths.append(tmp_path / f"m{t}.json")
        paths[-1].write_text(json.dumps(dets))
    (tmp_path / "images.json").write_text(json.dumps({"images": images, "categories": [{"id": c} for c in (1, 2, 3)]}))
    out = tmp_path / "fused.json"
    assert main(["fuse", "--images", str(tmp_path / "images.json"), "--out", str(out), "--dets", *map(str, paths),
                 "--model-weights", "1", "2", "1"]) == 0
    ref = []
    for im in images:
        w, h = im["width"], im["height"]
        bl, sl, ll = [], [], []
        for dets in models:
            d = [x for x in dets if x["image_id"] == im["id"]]
            bl.append([[x["bbox"][0] / w, x["bbox"][1] / h, (x["bbox"][0] + x["bbox"][2]) / w,
                        (x["bbox"][1] + x["bbox"][3]) / h] for x in d])
            sl.append([x["score"] for x in d])
            ll.append([x["category_id"] for x in d])
        if not any(sl):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b, s, lab = eb.weighted_boxes_fusion(bl, sl, ll, weights=[1, 2, 1], iou_thr=0.55)
        for (x1, y1, x2, y2), sc, c in zip(b.tolist(), s.tolist(), lab.tolist()):
            ref.append({"image_id": im["id"], "category_id": int(c),
                        "bbox": [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h], "score": sc})
    assert _strict_json(out) == ref


def _nan_files(tmp):
    # Model B's copy of the Man box has a NaN score: it must be dropped, not fused (a NaN score would
    # make the fused box NaN).
    b = [dict(d) for d in B]
    b[0]["score"] = float("nan")
    b[1]["bbox"] = [102, 50, float("inf"), 40]
    (tmp / "nan.json").write_text(json.dumps(b))  # Python's json writes NaN / Infinity
    return b


def test_fuse_drops_nan_and_inf_and_counts_them(files, capsys):
    tmp, p = files
    b = _nan_files(tmp)
    out = tmp / "fused.json"
    assert main(["fuse", "--dets", str(p["a"]), str(tmp / "nan.json"), "--images", str(p["images"]),
                 "--out", str(out), "--iou", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "dropped 2 input detections with a NaN or infinite box or score" in captured.out
    assert "2 detections with a NaN or infinite box or score were dropped" in captured.err
    got = _strict_json(out)
    # The same as fusing without the two bad entries.
    (tmp / "clean.json").write_text(json.dumps(b[2:]))
    ref = tmp / "ref.json"
    assert main(["fuse", "--dets", str(p["a"]), str(tmp / "clean.json"), "--images", str(p["images"]),
                 "--out", str(ref), "--iou", "0.5"]) == 0
    assert got == _strict_json(ref)
    man = [d for d in got if d["category_id"] == 3]
    assert len(man) == 1 and man[0]["bbox"] == pytest.approx([20, 10, 40, 30]) and man[0]["score"] == pytest.approx(0.45)


def test_fuse_zero_score_clusters_never_reach_the_output(tmp_path, capsys):
    """WBF's fused box of a cluster whose scores are all 0 is 0/0 (in ensemble-boxes too): dropped, counted."""
    images = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": []}
    a = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.0},
         {"image_id": 1, "category_id": 1, "bbox": [60, 60, 30, 30], "score": 0.5}]
    b = [{"image_id": 1, "category_id": 1, "bbox": [11, 10, 50, 50], "score": 0.0}]
    for name, data in (("images", images), ("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    out = tmp_path / "f.json"
    assert main(["fuse", "--dets", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                 "--images", str(tmp_path / "images.json"), "--out", str(out)]) == 0
    assert "dropped 1 fused boxes of zero-score clusters" in capsys.readouterr().out
    got = _strict_json(out)
    assert len(got) == 1 and got[0]["bbox"] == pytest.approx([60, 60, 30, 30])


@pytest.mark.parametrize(("entry", "problem"), [
    ({"score": 1.5}, "detection 1: score 1.5 is outside [0, 1]"),
    ({"score": -0.25}, "detection 1: score -0.25 is outside [0, 1]"),
    ({"bbox": [50, 50, -5, 10]}, "detection 1: bbox [50.0, 50.0, -5.0, 10.0] has a negative width or height"),
    ({"category_id": 5}, "detection 1: category id 5 is not among"),
    ({"image_id": 99}, "detection 1: image id 99 is not in"),
    ({"score": "0.5"}, "detection 1: 'score' must be a number"),
    ({"bbox": [1, 2, 3]}, "detection 1: 'bbox' must be four numbers"),
    ({"image_id": "1"}, "detection 1: 'image_id' must be an integer"),
])
def test_fuse_rejects_bad_entries_and_keeps_the_old_output(files, capsys, entry, problem):
    tmp, p = files
    bad = [dict(A[0]), {**A[1], **entry}, dict(A[2])]
    (tmp / "bad.json").write_text(json.dumps(bad))
    out = tmp / "fused.json"
    out.write_text("old")
    assert main(["fuse", "--dets", str(p["a"]), str(tmp / "bad.json"), "--images", str(p["images"]),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"bad.json: {problem}" in err
    assert out.read_text() == "old"


@pytest.mark.parametrize(("options", "problem"), [
    (["--iou", "0"], "--iou must be in (0, 1]"),
    (["--iou", "1.5"], "--iou must be in (0, 1]"),
    (["--iou", "nan"], "--iou must be in (0, 1]"),
    (["--model-weights", "-1", "1"], "--model-weights must be finite and non-negative"),
    (["--model-weights", "nan", "1"], "--model-weights must be finite and non-negative"),
    (["--model-weights", "inf", "1"], "--model-weights must be finite and non-negative"),
    (["--model-weights", "0", "0"], "--model-weights are all zero"),
    (["--model-weights", "1", "1", "1"], "--model-weights has 3 values for 2 --dets files"),
    (["--skip-score", "2"], "--skip-score must be in [0, 1]"),
])
def test_fuse_rejects_bad_options(files, capsys, options, problem):
    tmp, p = files
    out = tmp / "fused.json"
    assert main(["fuse", "--dets", str(p["a"]), str(p["b"]), "--images", str(p["images"]), "--out", str(out),
                 *options]) == 2
    assert problem in capsys.readouterr().err
    assert not out.exists()


def test_fuse_write_failure_keeps_the_old_output(files, monkeypatch):
    """The output is written atomically: a failure while writing (here the flush to disk) leaves the old file."""
    tmp, p = files
    out = tmp / "fused.json"
    out.write_text("old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        main(["fuse", "--dets", str(p["a"]), str(p["b"]), "--images", str(p["images"]), "--out", str(out)])
    assert out.read_text() == "old"
    assert sorted(x.name for x in tmp.iterdir() if x.name.startswith(".fused")) == []


def test_fuse_imports_neither_torch_nor_numba_for_small_files(files):
    """The fuse path needs NumPy only: torch, albumentations and pycocotools (no masks here) are not imported,
    nor Numba, whose import costs more than the lock-step clustering of an ordinary results file."""
    import subprocess
    import sys

    tmp, p = files
    code = (
        "import sys\nfrom vision.cli import main\n"
        f"assert main(['fuse', '--dets', {str(p['a'])!r}, {str(p['b'])!r}, '--images', {str(p['images'])!r},"
        f" '--out', {str(tmp / 'f.json')!r}]) == 0\n"
        "heavy = sorted(m for m in ('torch', 'albumentations', 'pycocotools', 'numba', 'cv2') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "VISION_NUMBA"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
