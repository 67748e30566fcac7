"""The synthetic data set: valid COCO by pycocotools' reading, exact masks, determinism, long tail."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vision.cli import main
from vision.data.synthetic import class_weights, make_synthetic_dataset
from vision.errors import VisionError

os.environ["HF_HUB_OFFLINE"] = "1"
# pycocotools' decode under NumPy 2 warns about the copy keyword on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SMALL = {"num_train": 24, "num_val": 8, "image_size": (128, 96), "min_object_size": 10, "semantic": True}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn"), seed=3, **SMALL)


def _decode(ann: dict, h: int, w: int) -> np.ndarray:
    """The annotation's mask as pycocotools reads it (polygons through its own rasteriser)."""
    seg = ann["segmentation"]
    rle = mask_util.merge(mask_util.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
    return mask_util.decode(rle).astype(bool)


def _masks_by_image(path: str) -> tuple[dict, dict[int, list[tuple[dict, np.ndarray]]]]:
    data = json.loads(Path(path).read_text())
    images = {im["id"]: im for im in data["images"]}
    out: dict[int, list[tuple[dict, np.ndarray]]] = {i: [] for i in images}
    for ann in data["annotations"]:
        im = images[ann["image_id"]]
        out[ann["image_id"]].append((ann, _decode(ann, im["height"], im["width"])))
    return data, out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    kw = {"num_train": 5, "num_val": 2, "image_size": (96, 64), "min_object_size": 8, "semantic": True}
    a = _files(Path(make_synthetic_dataset(tmp_path / "a", seed=7, **kw)["out_dir"]))
    b = _files(Path(make_synthetic_dataset(tmp_path / "b", seed=7, **kw)["out_dir"]))
    c = _files(Path(make_synthetic_dataset(tmp_path / "c", seed=8, **kw)["out_dir"]))
    assert len(a) == 2 + 7 + 7  # two JSON files, seven images, seven semantic masks
    assert a == b
    assert a.keys() == c.keys()
    assert a["train.json"] != c["train.json"]
    assert all(a[k] != c[k] for k in a if k.startswith("images/"))


def test_boxes_and_areas_are_those_of_the_decoded_masks(small: dict) -> None:
    kinds = set()
    for split in ("train", "val"):
        _, by_image = _masks_by_image(small[split])
        for anns in by_image.values():
            for ann, m in anns:
                kinds.add("polygon" if isinstance(ann["segmentation"], list) else "rle")
                ys, xs = np.nonzero(m)
                x0, y0 = xs.min(), ys.min()
                assert ann["bbox"] == [x0, y0, xs.max() - x0 + 1, ys.max() - y0 + 1], ann["id"]
                assert ann["area"] == int(m.sum())
                assert ann["iscrowd"] == 0
    assert kinds == {"polygon", "rle"}


def test_no_pixel_belongs_to_two_instances_and_occlusion_happens(small: dict) -> None:
    overlapping_boxes = 0
    for split in ("train", "val"):
        _, by_image = _masks_by_image(small[split])
        for anns in by_image.values():
            if not anns:
                continue
            stack = np.stack([m for _, m in anns]).astype(int)
            assert stack.sum(0).max() <= 1
            boxes = [a["bbox"] for a, _ in anns]
            for i in range(len(boxes)):
                for j in range(i):
                    (x, y, w, h), (u, v, p, q) = boxes[i], boxes[j]
                    if min(x + w, u + p) - max(x, u) > 2 and min(y + h, v + q) - max(y, v) > 2:
                        overlapping_boxes += 1
    # The test means something only if shapes do overlap in the data.
    assert overlapping_boxes >= 3


def test_semantic_masks_are_the_union_of_instance_masks(small: dict) -> None:
    data, by_image = _masks_by_image(small["train"])
    label_of = {c["id"]: k + 1 for k, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    for im in data["images"]:
        stem = Path(im["file_name"]).stem
        sem = cv2.imread(str(Path(small["semantic_dir"]) / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert sem.shape == (im["height"], im["width"]) and sem.dtype == np.uint8
        expected = np.zeros_like(sem)
        for ann, m in by_image[im["id"]]:
            expected[m] = label_of[ann["category_id"]]
        np.testing.assert_array_equal(sem, expected)


def test_semantic_ignore_band_marks_only_boundaries(tmp_path: Path) -> None:
    s = make_synthetic_dataset(tmp_path, num_train=3, num_val=0, image_size=(96, 64), min_object_size=12,
                               semantic=True, semantic_ignore_width=1)
    data, by_image = _masks_by_image(s["train"])
    for im in data["images"]:
        sem = cv2.imread(str(Path(s["semantic_dir"]) / Path(im["file_name"]).with_suffix(".png")),
                         cv2.IMREAD_UNCHANGED)
        instances = np.zeros(sem.shape, np.float32)
        for k, (_, m) in enumerate(by_image[im["id"]], start=1):
            instances[m] = k
        kernel = np.ones((3, 3), np.uint8)
        edge = cv2.dilate(instances, kernel) != cv2.erode(instances, kernel)
        assert (sem == 255).sum() > 0
        np.testing.assert_array_equal(sem == 255, edge)


def test_images_and_json_are_consistent(small: dict) -> None:
    data = json.loads(Path(small["train"]).read_text())
    assert [c["id"] for c in data["categories"]] == [1, 3, 5, 7, 9, 11]
    assert [c["name"] for c in data["categories"]] == ["circle", "square", "triangle", "star", "ellipse",
                                                       "cross"]
    val = json.loads(Path(small["val"]).read_text())
    assert not {i["id"] for i in data["images"]} & {i["id"] for i in val["images"]}
    for im in data["images"]:
        img = cv2.imread(str(Path(small["images_dir"]) / im["file_name"]), cv2.IMREAD_UNCHANGED)
        assert img.shape == (im["height"], im["width"], 3) == (96, 128, 3)
    assert sum(small["counts"]["train"].values()) == len(data["annotations"]) > len(data["images"])


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ground_truth_as_detections_scores_ap_one(small: dict, iou_type: str, capsys) -> None:
    gt = COCO(small["train"])
    dets = []
    for ann in gt.dataset["annotations"]:
        d = {"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0}
        if iou_type == "bbox":
            d["bbox"] = ann["bbox"]
        else:
            d["segmentation"] = gt.annToRLE(ann)
        dets.append(d)
    ev = COCOeval(gt, gt.loadRes(dets), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    assert ev.stats[1] == pytest.approx(1.0)


def test_class_weights_are_geometric_with_the_requested_ratio() -> None:
    w = class_weights(6, 100)
    assert w[0] / w[-1] == pytest.approx(100)
    np.testing.assert_allclose(w[1:] / w[:-1], 100 ** (-1 / 5))
    np.testing.assert_allclose(class_weights(4, None), 1.0)


def test_long_tail_instance_counts_follow_the_ratio(tmp_path: Path) -> None:
    s = make_synthetic_dataset(tmp_path, num_train=150, num_val=0, image_size=(96, 72), max_objects=4,
                               min_object_size=8, long_tail=20)
    counts = np.array(list(s["counts"]["train"].values()), float)
    w = 20 ** (-np.arange(6) / 5)
    expected = w / w.sum() * counts.sum()
    assert np.all(np.abs(counts - expected) <= np.maximum(2, 0.1 * expected)), (counts, expected)
    assert counts[0] / counts[-1] == pytest.approx(20, rel=0.25)


def test_long_tail_one_class_per_image(tmp_path: Path) -> None:
    s = make_synthetic_dataset(tmp_path, num_train=120, num_val=0, image_size=(80, 64), max_objects=3,
                               min_object_size=8, long_tail=10, one_class_per_image=True)
    data = json.loads(Path(s["train"]).read_text())
    classes_of: dict[int, set[int]] = {}
    for ann in data["annotations"]:
        classes_of.setdefault(ann["image_id"], set()).add(ann["category_id"])
    assert all(len(c) == 1 for c in classes_of.values())
    images_per_class = np.array([sum(c == {cid} for c in classes_of.values()) for cid in (1, 3, 5, 7, 9, 11)])
    w = 10 ** (-np.arange(6) / 5)
    expected = w / w.sum() * 120
    assert np.all(np.abs(images_per_class - expected) <= 1.5), (images_per_class, expected)


def test_balanced_val_beside_a_long_tailed_train_split(tmp_path: Path) -> None:
    s = make_synthetic_dataset(tmp_path, num_train=60, num_val=60, image_size=(80, 64), max_objects=3,
                               min_object_size=8, long_tail=50, one_class_per_image=True, balanced_val=True)
    val = json.loads(Path(s["val"]).read_text())
    images_per_class = Counter({a["image_id"]: a["category_id"] for a in val["annotations"]}.values())
    assert sorted(images_per_class.values()) == [10] * 6, images_per_class
    train = np.array(list(s["counts"]["train"].values()))
    assert train[0] > 10 * train[-1], "the training split keeps its long tail"


def test_class_count_and_contiguous_ids(tmp_path: Path) -> None:
    s = make_synthetic_dataset(tmp_path, num_train=2, num_val=1, image_size=(64, 48), min_object_size=8,
                               classes=3, contiguous_ids=True)
    cats = json.loads(Path(s["val"]).read_text())["categories"]
    assert [(c["id"], c["name"]) for c in cats] == [(1, "circle"), (2, "square"), (3, "triangle")]


def test_cli_writes_the_data_set(tmp_path: Path, capsys) -> None:
    out = tmp_path / "shapes"
    rc = main(["synthetic", "--out", str(out), "--num-train", "3", "--num-val", "2", "--size", "96", "64",
               "--semantic", "--long-tail", "5", "--seed", "1"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "3 train + 2 val" in lines[0]
    assert COCO(str(out / "train.json")).getImgIds() == [1, 2, 3]
    assert len(list((out / "images").glob("*.png"))) == 5
    assert len(list((out / "semantic").glob("*.png"))) == 5


def test_cli_small_images_get_fitting_shape_sizes(tmp_path: Path, capsys) -> None:
    assert main(["synthetic", "--out", str(tmp_path), "--num-train", "2", "--num-val", "0",
                 "--size", "40", "30", "--classes", "2"]) == 0
    anns = json.loads((tmp_path / "train.json").read_text())["annotations"]
    assert anns and max(max(a["bbox"][2:]) for a in anns) <= 0.45 * 30 + 1  # diameter, +1 px of raster


@pytest.mark.parametrize("argv", [["--num-train", "-1"], ["--classes", "circle,blob"], ["--size", "8", "8"],
                                  ["--object-size", "30", "10"], ["--long-tail", "0.5"]])
def test_cli_bad_input_is_one_line(tmp_path: Path, capsys, argv: list[str]) -> None:
    assert main(["synthetic", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_empty_images_and_jpeg(tmp_path: Path) -> None:
    s = make_synthetic_dataset(tmp_path, num_train=8, num_val=0, image_size=(64, 48), empty_fraction=0.5,
                               image_format="jpg")
    gt = COCO(s["train"])
    assert sum(not gt.getAnnIds(imgIds=[i]) for i in gt.getImgIds()) == 4
    for im in gt.dataset["images"]:
        assert im["file_name"].endswith(".jpg")
        assert cv2.imread(str(Path(s["images_dir"]) / im["file_name"])).shape == (48, 64, 3)



def _pixels(root: str, data: dict, by_image: dict) -> list[tuple[np.ndarray, np.ndarray, list[np.ndarray]]]:
    """(image, background mask, shape masks) for every image of a split."""
    files = {im["id"]: im["file_name"] for im in data["images"]}
    out = []
    for image_id, pairs in by_image.items():
        img = cv2.imread(str(Path(root) / files[image_id])).astype(np.float32)
        fg = np.zeros(img.shape[:2], bool)
        for _, m in pairs:
            fg |= m
        out.append((img, ~fg, [m for _, m in pairs]))
    return out


def _spread(pixels: np.ndarray) -> float:
    return float((np.percentile(pixels, 99, 0) - np.percentile(pixels, 1, 0)).max())


def test_plain_style_has_flat_backgrounds_and_contrasting_flat_shapes(tmp_path: Path) -> None:
    """The demo's easy data: nothing but the annotated shapes stands out, and every shape does."""
    kw = {"num_train": 12, "num_val": 0, "image_size": (96, 80), "classes": 3, "min_object_size": 20,
          "max_object_size": 40, "seed": 1}
    plain = make_synthetic_dataset(tmp_path / "plain", style="plain", **kw)
    textured = make_synthetic_dataset(tmp_path / "textured", **kw)
    plain_data, plain_masks = _masks_by_image(plain["train"])
    tex_data, tex_masks = _masks_by_image(textured["train"])
    assert plain_data["info"]["style"] == "plain" and "style" not in tex_data["info"]
    assert len(plain_data["annotations"]) >= 12
    spreads = []
    for img, bg, shapes in _pixels(plain["images_dir"], plain_data, plain_masks):
        spreads.append(_spread(img[bg]))
        for m in shapes:  # a flat colour (up to the noise), far from the background's
            assert _spread(img[m]) <= 10
            assert np.abs(img[m].mean(0) - np.median(img[bg], 0)).sum() > 100
    tex_spreads = [_spread(img[bg]) for img, bg, _ in _pixels(textured["images_dir"], tex_data, tex_masks)]
    assert max(spreads) <= 70  # a gentle shade (at most 30 per channel) plus a little noise
    assert np.median(tex_spreads) > 2 * max(spreads)
    with pytest.raises(VisionError, match="style"):
        make_synthetic_dataset(tmp_path / "bad", style="fancy", **kw)
