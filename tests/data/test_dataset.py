"""The detection dataset: tensors as torchvision takes them, bad images skipped, instances aligned."""

import os

import cv2
import numpy as np
import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A

from vision.data.build import drop_unreadable_images
from vision.data.dataset import DetectionDataset, collate_detection, record_masks
from vision.data.records import Categories, DetectionSet, ImageRecord
from vision.data.transforms import DetectionTransform, masks_to_boxes


def _shapes_record(tmp_path, image_id=1, size=(96, 128)):
    """An image with an ellipse, a triangle and a rectangle, their polygon segmentations and tight boxes."""
    h, w = size
    rng = np.random.default_rng(image_id)
    image = rng.integers(0, 255, (h, w, 3), np.uint8)
    polys = [
        cv2.ellipse2Poly((40, 30), (18, 10), 30, 0, 360, 10),
        np.array([[70, 60], [110, 70], [85, 90]]),
        np.array([[10, 60], [40, 60], [40, 85], [10, 85]]),
    ]
    segs, boxes = [], []
    for k, poly in enumerate(polys):
        m = np.zeros((h, w), np.uint8)
        cv2.fillPoly(m, [poly.astype(np.int32)], 1)
        image[m > 0] = (60 * k, 255 - 60 * k, 128)
        segs.append([poly.astype(float).reshape(-1).tolist()])
        boxes.append(masks_to_boxes(m[None])[0])
    path = tmp_path / f"{image_id}.png"
    cv2.imwrite(str(path), image[..., ::-1])
    return ImageRecord(image_id, path.name, str(path), w, h, np.array(boxes, np.float32), np.array([1, 2, 1]),
                       np.zeros(3, bool), np.zeros(3, bool), segs)


def _set(records):
    return DetectionSet(Categories.from_names(["round", "pointy"]), records, source="test")


def test_items_are_what_torchvision_detectors_take(tmp_path):
    ds = DetectionDataset(_set([_shapes_record(tmp_path)]), with_masks=True)
    image, target = ds[0]
    assert image.shape == (3, 96, 128) and image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["masks"].shape == (3, 96, 128) and target["masks"].dtype == torch.uint8
    images, targets = collate_detection([ds[0], ds[0]])
    assert len(images) == 2 and targets[1]["image_id"] == 1


def test_crowd_regions_are_left_out_of_training_targets(tmp_path):
    record = _shapes_record(tmp_path)
    record.iscrowd[1] = True
    _, target = DetectionDataset(_set([record]))[0]
    assert target["labels"].tolist() == [1, 1]


def test_unreadable_images_are_skipped_by_check_and_at_load(tmp_path, caplog):
    good = _shapes_record(tmp_path, 1)
    bad = _shapes_record(tmp_path, 2)
    with open(bad.path, "r+b") as f:
        f.truncate(100)
    det_set = _set([bad, good])
    # At load time (e.g. the file broke after the check): another image is served and the bad one named.
    _, target = DetectionDataset(det_set)[0]
    assert target["image_id"] == 1
    assert any("2.png" in r.getMessage() for r in caplog.records)
    # Before training: the header check drops it and keeps the list of what was skipped.
    drop_unreadable_images(det_set)
    assert [r.image_id for r in det_set.records] == [1] and "2.png" in det_set.skipped_images[0]


@pytest.mark.parametrize("seed", range(6))
def test_boxes_stay_tight_around_masks_through_flip_scale_crop_rotation(tmp_path, seed):
    from vision.engine.seeding import seed_transform

    record = _shapes_record(tmp_path)
    transform = DetectionTransform([
        A.HorizontalFlip(p=0.5),
        A.RandomScale(scale_limit=(-0.2, 0.5), p=1.0),
        A.RandomCrop(64, 88, p=1.0),
        A.Rotate(limit=40, border_mode=cv2.BORDER_CONSTANT, p=1.0),
    ])
    ds = DetectionDataset(_set([record]), transform=transform, with_masks=True)
    # A crop may leave no instance at all, so several seeded draws are checked and most must keep some.
    kept = 0
    for draw in range(8):
        seed_transform(transform, 100 * seed + draw)
        _, target = ds[0]
        masks = target["masks"].numpy()
        kept += len(masks)
        assert len(masks) == len(target["boxes"]) == len(target["labels"])
        for box, mask in zip(target["boxes"].numpy(), masks):
            ys, xs = np.nonzero(mask)
            tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            assert np.abs(box - tight).max() <= 1.0
    assert kept >= 4


def test_record_masks_decode_polygons_like_pycocotools(tmp_path):
    from pycocotools import mask as mask_utils

    record = _shapes_record(tmp_path)
    masks = record_masks(record)
    for k, seg in enumerate(record.segmentations):
        ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, record.height, record.width)))
        np.testing.assert_array_equal(masks[k], ref)
