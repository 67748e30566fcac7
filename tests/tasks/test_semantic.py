"""Semantic segmentation: the FPN model, the three mask readers, the metrics, training and prediction."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from vision.config import AugmentConfig, ModelConfig, load_config
from vision.data.semantic import (
    SemanticDataset,
    build_semantic_train_transform,
    read_coco_semantic,
    read_mask_folder,
    read_mask_list,
    validate_set,
)
from vision.errors import ConfigError, DataError
from vision.metrics.semantic import confusion_matrix, metrics_from_confusion
from vision.models import build_model
from vision.models.semantic import dice_loss


def tiny_model(num_classes: int = 3, **kw) -> torch.nn.Module:
    cfg = ModelConfig(
        arch="semantic_fpn", backbone="test_resnet", num_classes=num_classes, fpn_channels=32, seg_channels=16,
        frozen_bn=True, min_size=[], **kw,
    )
    torch.manual_seed(0)
    return build_model(cfg)


# model --------------------------------------------------------------------------------------------


def test_forward_backward_and_eval_shapes_at_odd_sizes():
    model = tiny_model(dice_weight=0.5)
    images = [torch.rand(3, 37, 53), torch.rand(3, 64, 45)]
    targets = [{"sem_seg": torch.randint(0, 4, (37, 53))}, {"sem_seg": torch.randint(0, 4, (64, 45))}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_ce", "loss_dice"}
    sum(losses.values()).backward()
    assert model.head.classifier.weight.grad.abs().sum() > 0
    assert next(model.backbone.body.parameters()).grad.abs().sum() > 0
    model.eval()
    model.return_probs = True
    out = model(images)
    assert [o["sem_seg"].shape for o in out] == [(37, 53), (64, 45)]
    assert out[0]["probs"].shape == (4, 37, 53)
    torch.testing.assert_close(out[0]["probs"].sum(0), torch.ones(37, 53))
    assert torch.equal(out[0]["probs"].argmax(0), out[0]["sem_seg"])


def test_resize_predicts_at_the_input_size():
    model = tiny_model(max_size=64)
    model.min_size = (32,)
    model.eval()
    out = model([torch.rand(3, 50, 71)])
    assert out[0]["sem_seg"].shape == (50, 71)


def test_padding_and_batching_change_nothing():
    """Each image's loss and prediction are those it gets alone: padding is ignored and cropped away."""
    model = tiny_model()
    a, b = torch.rand(3, 37, 53), torch.rand(3, 64, 45)  # both pad to 64x64 alone and together
    ta, tb = torch.randint(0, 4, (37, 53)), torch.randint(0, 4, (64, 45))
    model.train()
    both = model([a, b], [{"sem_seg": ta}, {"sem_seg": tb}])["loss_ce"]
    la = model([a], [{"sem_seg": ta}])["loss_ce"]
    lb = model([b], [{"sem_seg": tb}])["loss_ce"]
    na, nb = ta.numel(), tb.numel()
    torch.testing.assert_close(both, (na * la + nb * lb) / (na + nb), rtol=1e-4, atol=1e-5)
    model.eval()
    pa = model([a])[0]["sem_seg"]
    assert torch.equal(model([a, b])[0]["sem_seg"], pa)


def test_ignored_pixels_give_no_loss():
    model = tiny_model(dice_weight=1.0)
    model.train()
    img = torch.rand(3, 32, 32)
    losses = model([img], [{"sem_seg": torch.full((32, 32), 255)}])
    assert float(losses["loss_ce"].detach()) == 0.0
    sum(losses.values()).backward()  # still a graph


def test_dice_loss_hand_computed():
    # uniform logits -> p = 0.5 everywhere; target [0, 1, ignore]:
    # class 0: inter 0.5, sums 1 + 1 -> Dice (2*0.5 + 1) / (2 + 1) = 2/3; class 1 the same -> loss 1/3
    logits = torch.zeros(1, 2, 1, 3)
    target = torch.tensor([[[0, 1, 255]]])
    assert float(dice_loss(logits, target, 255)) == pytest.approx(1 / 3)


# metrics ------------------------------------------------------------------------------------------


def test_confusion_matrix_and_metrics_hand_computed():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    # rows = truth, cols = prediction; the ignored pixel counts nowhere
    expected = np.array([[1, 1, 0], [1, 2, 0], [1, 0, 1]])
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 3, 255)
    np.testing.assert_array_equal(cm, expected)
    m = metrics_from_confusion(cm, ["bg", "a", "b"])
    # IoU: bg 1/(2+3-1)=1/4, a 2/(3+3-2)=1/2, b 1/(2+1-1)=1/2
    assert m["per_class_iou"] == pytest.approx({"bg": 0.25, "a": 0.5, "b": 0.5})
    assert m["mIoU"] == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert m["pixel_accuracy"] == pytest.approx(4 / 7)
    assert m["mean_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_absent_class_is_left_out_of_the_mean():
    cm = np.array([[3, 0, 0], [0, 1, 0], [0, 0, 0]])  # class 2 neither present nor predicted
    m = metrics_from_confusion(cm, ["bg", "a", "b"])
    assert np.isnan(m["per_class_iou"]["b"])
    assert m["mIoU"] == pytest.approx(1.0)


# data ---------------------------------------------------------------------------------------------


def _write_pair(images: Path, masks: Path, stem: str, mask: np.ndarray) -> None:
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    h, w = mask.shape
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = mask * 60  # the class is readable from the pixels
    cv2.imwrite(str(images / f"{stem}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 100])
    cv2.imwrite(str(masks / f"{stem}.png"), mask.astype(np.uint8))


def test_folder_pair_and_list_file(tmp_path):
    m1 = np.zeros((10, 12), np.uint8)
    m1[2:5, 3:9] = 1
    m1[7:, :4] = 2
    m2 = np.full((8, 6), 255, np.uint8)
    m2[:4] = 0
    _write_pair(tmp_path / "img", tmp_path / "ann", "a", m1)
    _write_pair(tmp_path / "img", tmp_path / "ann", "b", m2)
    folder = validate_set(read_mask_folder(str(tmp_path / "img"), str(tmp_path / "ann"), ["x", "y"]))
    assert [Path(i.path).name for i in folder.items] == ["a.jpg", "b.jpg"]
    assert [i.classes.tolist() for i in folder.items] == [[1, 2], []]
    ds = SemanticDataset(folder)
    image, target = ds[0]
    assert image.shape == (3, 10, 12)
    np.testing.assert_array_equal(target["sem_seg"].numpy(), m1)
    np.testing.assert_array_equal(ds[1][1]["sem_seg"].numpy(), m2)

    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("# image mask\n../img/b.jpg ../ann/b.png\n\n../img/a.jpg ../ann/a.png\n")
    listed = validate_set(read_mask_list(str(tmp_path / "lists" / "train.txt"), ["x", "y"]))
    assert [Path(i.path).name for i in listed.items] == ["b.jpg", "a.jpg"]
    np.testing.assert_array_equal(SemanticDataset(listed)[1][1]["sem_seg"].numpy(), m1)

    # an id list restricts a folder pair
    (tmp_path / "ids.txt").write_text("b\n")
    only_b = read_mask_folder(str(tmp_path / "img"), str(tmp_path / "ann"), ["x", "y"], str(tmp_path / "ids.txt"))
    assert [Path(i.path).name for i in only_b.items] == ["b.jpg"]


def test_bad_masks_are_named(tmp_path):
    _write_pair(tmp_path / "img", tmp_path / "ann", "a", np.zeros((10, 12), np.uint8))
    cv2.imwrite(str(tmp_path / "img" / "lonely.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match=r"lonely\.png: no mask"):
        read_mask_folder(str(tmp_path / "img"), str(tmp_path / "ann"), ["x"])
    (tmp_path / "img" / "lonely.png").unlink()

    cv2.imwrite(str(tmp_path / "ann" / "a.png"), np.zeros((9, 12), np.uint8))  # wrong size
    with pytest.raises(DataError, match=r"a\.png: mask is 12x9 but its image is 12x10"):
        validate_set(read_mask_folder(str(tmp_path / "img"), str(tmp_path / "ann"), ["x"]))

    bad = np.zeros((10, 12), np.uint8)
    bad[0, 0] = 3  # classes are 0..1 (+255)
    cv2.imwrite(str(tmp_path / "ann" / "a.png"), bad)
    with pytest.raises(DataError, match=r"a\.png: label values 3 out of range"):
        validate_set(read_mask_folder(str(tmp_path / "img"), str(tmp_path / "ann"), ["x"]))

    (tmp_path / "l.txt").write_text("img/a.jpg ann/missing.png\n")
    with pytest.raises(DataError, match=r"l\.txt: line 1: mask .*missing\.png not found"):
        read_mask_list(str(tmp_path / "l.txt"), ["x"])
    with pytest.raises(ConfigError, match="class_names"):
        read_mask_list(str(tmp_path / "l.txt"), None)



def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def test_coco_rasterised_by_category_with_crowd_ignored(tmp_path):
    h, w = 12, 16
    cv2.imwrite(str(tmp_path / "im.png"), np.zeros((h, w, 3), np.uint8))
    crowd = np.zeros((h, w), np.uint8)
    crowd[6:12, 0:10] = 1
    coco = {
        "images": [{"id": 5, "file_name": "im.png", "width": w, "height": h}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            # a polygon square (pixels 1..4 x 1..4), category 7 -> label 2
            {"id": 1, "image_id": 5, "category_id": 7, "iscrowd": 0, "bbox": [1, 1, 4, 4],
             "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]},
            {"id": 2, "image_id": 5, "category_id": 3, "iscrowd": 1, "bbox": [0, 6, 10, 6], "segmentation": _rle(crowd)},
            # an instance over part of the crowd region, category 3 -> label 1
            {"id": 3, "image_id": 5, "category_id": 3, "iscrowd": 0, "bbox": [8, 8, 6, 3],
             "segmentation": _rle(np.pad(np.ones((3, 6), np.uint8), ((8, 1), (8, 2))))},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    sem_set = read_coco_semantic(str(tmp_path / "ann.json"), str(tmp_path))
    expected = np.zeros((h, w), np.uint8)
    expected[crowd == 1] = 255
    expected[8:11, 8:14] = 1
    expected[1:5, 1:5] = 2  # the polygon covers pixel centres 1.5..4.5
    got = SemanticDataset(sem_set)[0][1]["sem_seg"].numpy()
    np.testing.assert_array_equal(got, expected)
    assert sem_set.items[0].classes.tolist() == [1, 2]
    sem_set.crowd_ignore = False
    expected[(crowd == 1) & (expected == 255)] = 0
    np.testing.assert_array_equal(SemanticDataset(sem_set)[0][1]["sem_seg"].numpy(), expected)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from vision.data.synthetic import make_synthetic_dataset

    out = tmp_path_factory.mktemp("shapes")
    make_synthetic_dataset(out, num_train=8, num_val=4, image_size=(64, 48), classes=3, max_objects=3,
                           min_object_size=10, semantic=True, seed=1)
    for split in ("train", "val"):
        stems = sorted(p.stem for p in (out / "semantic").glob(f"{split}_*.png"))
        (out / f"{split}.txt").write_text("".join(f"images/{s}.png semantic/{s}.png\n" for s in stems))
    return out


def test_coco_rasterisation_matches_the_generator_masks(shapes):
    """The generator paints the class maps itself; rasterising its COCO file must give the same pixels."""
    sem_set = read_coco_semantic(str(shapes / "train.json"), str(shapes / "images"))
    for k, item in enumerate(sem_set.items):
        painted = cv2.imread(str(shapes / "semantic" / (Path(item.path).stem + ".png")), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(SemanticDataset(sem_set)[k][1]["sem_seg"].numpy(), painted)


def test_transforms_keep_image_and_mask_together(tmp_path):
    mask = np.zeros((40, 30), np.uint8)
    mask[3:20, 5:12] = 1
    mask[25:38, 14:29] = 2
    image = np.stack([mask * 100, np.zeros_like(mask), np.zeros_like(mask)], -1)
    transform = build_semantic_train_transform(AugmentConfig(hflip=0.5, vflip=0.5, rotate90=0.5, crop=1.0))
    import random

    for seed in range(12):
        transform.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = transform({"image": image, "mask": mask, "image_id": 1})
        assert out["image"].shape[:2] == out["mask"].shape
        np.testing.assert_array_equal(out["image"][..., 0] // 100, out["mask"])


# training and prediction --------------------------------------------------------------------------


def _tiny_config(root: Path, fmt: str, run: Path, **extra):
    split = {
        "coco": lambda s: {"format": "coco", "ann": f"{s}.json", "images": "images"},
        "mask_list": lambda s: {"format": "mask_list", "ann": f"{s}.txt"},
    }[fmt]
    overrides = [
        "model.arch=semantic_fpn", "model.backbone=test_resnet", "model.fpn_channels=32", "model.seg_channels=16",
        "model.min_size=[]", f"data.root={root}", f"data.train={json.dumps(split('train'))}",
        f"data.val={json.dumps(split('val'))}", "data.batch_size=4", "data.num_workers=0",
        "train.max_iters=4", "train.warmup_iters=1", "train.optimizer=adamw", "train.lr=0.001",
        "train.device=cpu", "train.log_every=1", f"output_dir={run}", "name=sem",
    ]
    if fmt == "mask_list":
        overrides.append("data.class_names=[circle, square, triangle]")
    return load_config(None, overrides + list(extra.get("more", [])))


@pytest.mark.parametrize("fmt", ["coco", "mask_list"])
def test_tiny_training_run_and_prediction(shapes, tmp_path, fmt, capsys):
    from vision.cli import main
    from vision.tasks.training import train

    cfg = _tiny_config(shapes, fmt, tmp_path)
    summary = train(cfg, tmp_path / "sem")
    assert summary["iterations"] == 4
    assert summary["score_name"] == "mIoU"
    metrics = summary["metrics"]
    assert 0.0 <= metrics["mIoU"] <= 1.0 and 0.0 <= metrics["pixel_accuracy"] <= 1.0
    assert set(metrics["per_class_iou"]) == {"background", "circle", "square", "triangle"}
    ckpt = torch.load(tmp_path / "sem" / "last.pt", weights_only=False)
    assert ckpt["arch"] == "semantic_fpn" and ckpt["class_names"] == ["circle", "square", "triangle"]
    # vision eval scores the checkpoint with the same task: the trainer's own mIoU on the same weights
    assert main(["eval", "--weights", str(tmp_path / "sem" / "last.pt"), "--out", str(tmp_path / "m.json")]) == 0
    assert "mIoU" in capsys.readouterr().out.splitlines()[-1]
    evaluated = json.loads((tmp_path / "m.json").read_text())
    assert evaluated["mIoU"] == pytest.approx(ckpt["metrics"]["mIoU"], abs=1e-9)
    if fmt == "coco":
        return
    out = tmp_path / "pred"
    weights = tmp_path / "sem" / ("best.pt" if (tmp_path / "sem" / "best.pt").exists() else "last.pt")
    src = shapes / "images"
    rc = main(["predict", "--weights", str(weights), "--source", str(src), "--out", str(out),
               "--save-images", "--workers", "0", "--device", "cpu"])
    assert rc == 0
    n = len(list(src.glob("*.png")))
    masks = sorted((out / "masks").glob("*.png"))
    assert len(masks) == n and len(list((out / "images").glob("*.png"))) == n
    m = cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED)
    assert m.shape == (48, 64) and m.max() <= 3
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["classes"] == ["background", "circle", "square", "triangle"] and len(pred["images"]) == n
    assert sum(pred["images"][0]["pixels"].values()) == pytest.approx(1.0, abs=1e-4)
    # a second run has nothing left to do
    assert main(["predict", "--weights", str(weights), "--source", str(src), "--out", str(out),
                 "--workers", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"predicted 0 images ({n} already done")
