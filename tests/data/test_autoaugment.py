"""Detection AutoAugment: the published policies, and boxes and masks that stay with the pixels."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from vision.data.autoaugment import POLICIES, DetectionAutoAugment, apply_operation, parse_policy
from vision.data.autoaugment_ops import OPERATIONS, AutoAugmentHparams
from vision.data.autoaugment_primitives import mask_boxes
from vision.errors import VisionError

H, W = 96, 128
# solid instance colours that neither the background texture (< 100) nor the grey fill (128) can take
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
POLICY_OPS = sorted({op for policy in POLICIES.values() for sub in policy for op, _, _ in sub})


def _scene(ellipses: bool = True, seed: int = 0) -> dict:
    """Four solid, well separated shapes on a textured background, with their masks and tight boxes."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 100, (H, W, 3), dtype=np.uint8)
    masks = np.zeros((4, H, W), np.uint8)
    cv2.rectangle(masks[0], (6, 8), (37, 35), 1, -1)
    cv2.rectangle(masks[1], (70, 10), (119, 29), 1, -1)
    if ellipses:
        cv2.ellipse(masks[2], (25, 70), (16, 10), 20, 0, 360, 1, -1)
        cv2.ellipse(masks[3], (95, 68), (12, 18), 0, 0, 360, 1, -1)
    else:
        cv2.rectangle(masks[2], (10, 58), (43, 83), 1, -1)
        cv2.rectangle(masks[3], (82, 50), (109, 87), 1, -1)
    for m, colour in zip(masks, COLOURS):
        image[m > 0] = colour
    boxes, _ = mask_boxes(masks)
    return {"image": image, "boxes": boxes, "labels": np.arange(1, 5, dtype=np.int64), "masks": masks}


def _colour_mask(image: np.ndarray, label: int) -> np.ndarray:
    return (image == np.array(COLOURS[label - 1], np.uint8)).all(2)


def _tight(mask: np.ndarray) -> np.ndarray:
    return mask_boxes(mask[None].astype(np.uint8))[0][0]


def _check_consistent(out: dict, geometric: bool, occluding: bool) -> None:
    """Boxes, labels and masks agree with each other and with where each instance's colour is."""
    n = len(out["labels"])
    assert out["boxes"].shape == (n, 4) and out["masks"].shape == (n, H, W)
    assert out["image"].shape == (H, W, 3) and out["image"].dtype == np.uint8 and out["image"].flags.writeable
    for box, mask, label in zip(out["boxes"], out["masks"], out["labels"]):
        assert mask.any()
        np.testing.assert_allclose(box, _tight(mask), atol=1)
        if geometric:
            seen = _colour_mask(out["image"], int(label))
            if occluding:
                assert not (seen & ~mask.astype(bool)).any()
            else:
                np.testing.assert_array_equal(seen, mask.astype(bool))
    if geometric:  # an instance that was dropped has left the image
        for label in set(range(1, 5)) - set(out["labels"].tolist()):
            assert not _colour_mask(out["image"], label).any()


HP = [AutoAugmentHparams(), AutoAugmentHparams(reference_size=2 * W)]


@pytest.mark.parametrize("name", sorted(set(OPERATIONS) | set(POLICY_OPS)))
def test_every_operation_keeps_boxes_and_masks_with_the_pixels(name):
    op = OPERATIONS[name]
    occluding = "Cutout" in name
    for level in (2, 6, 10):
        for seed in (0, 1, 2):
            for hp in HP:
                scene = _scene(seed=seed)
                out = apply_operation(name, scene, level, prob=3.0, rng=np.random.default_rng(seed), hparams=hp)
                _check_consistent(out, geometric=op.geometric or occluding, occluding=occluding)
                if not op.geometric:  # colour ops and cutouts leave the geometry untouched
                    np.testing.assert_array_equal(out["boxes"], scene["boxes"])
                    np.testing.assert_array_equal(out["masks"], scene["masks"])
                    np.testing.assert_array_equal(out["labels"], scene["labels"])


@pytest.mark.parametrize("name", sorted(n for n, op in OPERATIONS.items() if op.geometric))
def test_geometry_without_masks_moves_box_corners(name):
    """Without masks, a warped rectangle's box is the tight box of its pixels within 1 pixel."""
    in_boxes = OPERATIONS[name].in_boxes
    for level in (2, 6, 10):
        for seed in (0, 1, 2):
            for hp in HP:
                scene = _scene(ellipses=False, seed=seed)
                del scene["masks"]
                out = apply_operation(name, scene, level, prob=3.0, rng=np.random.default_rng(seed), hparams=hp)
                assert "masks" not in out and len(out["boxes"]) == len(out["labels"])
                for box, label in zip(out["boxes"], out["labels"]):
                    seen = _colour_mask(out["image"], int(label))
                    if in_boxes:  # boxes stay put; the content moved inside them
                        np.testing.assert_array_equal(box, scene["boxes"][label - 1])
                        x0, y0, x1, y1 = box.astype(int)
                        assert not seen[:y0].any() and not seen[y1:].any()
                        assert not seen[:, :x0].any() and not seen[:, x1:].any()
                    else:
                        # a slanted edge cut by the image border: the continuous corner polygon and
                        # its nearest-neighbour pixels may differ by up to 1/0.6 px along the border
                        assert seen.any()
                        np.testing.assert_allclose(box, _tight(seen), atol=2)
                for label in set(range(1, 5)) - set(out["labels"].tolist()):
                    assert not _colour_mask(out["image"], label).any()


def test_translation_far_enough_drops_every_instance():
    # the published constant translates by 250 px at level 10: everything leaves a 128 px image
    out = apply_operation("TranslateX_BBox", _scene(), 10, rng=np.random.default_rng(0))
    assert len(out["labels"]) == 0 and out["boxes"].shape == (0, 4) and out["masks"].shape == (0, H, W)
    assert (out["image"] == 128).all()


def _centred_rectangle() -> dict:
    masks = np.zeros((1, H, W), np.uint8)
    masks[0, 30:60, 40:80] = 1
    return {"image": np.zeros((H, W, 3), np.uint8), "boxes": mask_boxes(masks)[0], "labels": np.array([1]),
            "masks": masks}


def test_translation_moves_by_the_published_amount():
    # level 4 of 250 px, scaled to a 96 px image from a 960 px reference: 10 px
    hp = AutoAugmentHparams(reference_size=960)
    scene = _centred_rectangle()
    shifts = set()
    for seed in range(6):
        out = apply_operation("TranslateX_BBox", scene, 4, rng=np.random.default_rng(seed), hparams=hp)
        shift = out["boxes"][0] - scene["boxes"][0]
        assert shift[0] == shift[2] and shift[1] == shift[3] == 0
        shifts.add(float(shift[0]))
    assert shifts == {-10.0, 10.0}


def test_rotation_at_level_10_turns_by_30_degrees():
    image = np.zeros((H, W, 3), np.uint8)
    bar = np.zeros((1, H, W), np.uint8)
    bar[0, 47:49, 34:94] = 1  # 60 x 2, centred
    sample = {"image": image, "boxes": mask_boxes(bar)[0], "labels": np.array([1]), "masks": bar}
    out = apply_operation("Rotate_BBox", sample, 10, rng=np.random.default_rng(0))
    x1, y1, x2, y2 = out["boxes"][0]
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    assert abs((x2 - x1) - (60 * c + 2 * s)) <= 2 and abs((y2 - y1) - (60 * s + 2 * c)) <= 2


def test_shear_at_level_10_slants_by_0_3():
    scene = _centred_rectangle()
    out = apply_operation("ShearX_BBox", scene, 10, rng=np.random.default_rng(0))
    x1, y1, x2, y2 = scene["boxes"][0]
    nx1, ny1, nx2, ny2 = out["boxes"][0]
    assert (ny1, ny2) == (y1, y2)
    # each row shifts by 0.3 * y: the 30 rows spread the 40 px rectangle by 0.3 * 29 px
    assert abs((nx2 - nx1) - ((x2 - x1) + 0.3 * (y2 - y1 - 1))) <= 1


def test_flip_mirrors_a_known_box_exactly():
    scene = _scene()
    for masks in (True, False):
        sample = dict(scene) if masks else {k: v for k, v in scene.items() if k != "masks"}
        out = apply_operation("Flip", sample, 0)
        np.testing.assert_array_equal(out["boxes"][0], [W - 38, 8, W - 6, 36])
        np.testing.assert_array_equal(out["image"], scene["image"][:, ::-1])
        if masks:
            np.testing.assert_array_equal(out["masks"], scene["masks"][:, :, ::-1])


def test_colour_ops_known_values():
    image = np.array([[[0, 100, 200], [127, 128, 255]]], np.uint8)
    sample = {"image": image, "boxes": np.zeros((0, 4)), "labels": np.zeros(0)}

    def run(name, level):
        return apply_operation(name, sample, level)["image"].tolist()

    assert run("Solarize", 5) == [[[0, 100, 55], [127, 127, 0]]]  # threshold 128
    assert run("SolarizeAdd", 10) == [[[110, 210, 200], [237, 128, 255]]]  # +110 below 128
    assert run("Posterize", 5) == [[[0, 64, 192], [64, 128, 192]]]  # 2 bits
    assert run("Posterize", 2) == [[[0, 0, 128], [0, 128, 128]]]  # 0 bits: the shift saturates at 1 bit
    assert run("Brightness", 0) == [[[0, 10, 20], [12, 12, 25]]]  # factor 0.1


def test_policy_v0_is_the_published_one():
    published_v0 = [
        [("TranslateX_BBox", 0.6, 4), ("Equalize", 0.8, 10)],
        [("TranslateY_Only_BBoxes", 0.2, 2), ("Cutout", 0.8, 8)],
        [("Sharpness", 0.0, 8), ("ShearX_BBox", 0.4, 0)],
        [("ShearY_BBox", 1.0, 2), ("TranslateY_Only_BBoxes", 0.6, 6)],
        [("Rotate_BBox", 0.6, 10), ("Color", 1.0, 6)],
    ]
    assert POLICIES["v0"] == published_v0
    assert DetectionAutoAugment("v0").policy == published_v0
    assert [len(POLICIES[v]) for v in ("v0", "v1", "v2", "v3")] == [5, 20, 15, 15]
    assert POLICIES["v1"][:5] == published_v0


@pytest.mark.parametrize("policy", ["v0", "v1", "v2", "v3"])
def test_whole_policies_keep_instances_consistent(policy):
    aug = DetectionAutoAugment(policy, seed=0, hparams=AutoAugmentHparams(reference_size=2 * W))
    for seed in range(30):
        out = aug(_scene(seed=seed))
        n = len(out["labels"])
        assert out["boxes"].shape == (n, 4) and out["masks"].shape == (n, H, W)
        for box, mask in zip(out["boxes"], out["masks"]):
            assert mask.any()
            np.testing.assert_allclose(box, _tight(mask), atol=1)


def test_policy_from_config_list_and_reproducible_draws():
    policy = [[["Equalize", 0.8, 10], ["TranslateX_BBox", 0.8, 4]], [["Rotate_BBox", 1.0, 6]]]
    assert parse_policy(policy) == [[("Equalize", 0.8, 10.0), ("TranslateX_BBox", 0.8, 4.0)],
                                    [("Rotate_BBox", 1.0, 6.0)]]
    a = DetectionAutoAugment(policy, seed=3)
    b = DetectionAutoAugment(policy, seed=3)
    for seed in range(5):
        x, y = a(_scene(seed=seed)), b(_scene(seed=seed))
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["boxes"], y["boxes"])


def test_set_random_seed_replays_a_draw():
    """What the trainer relies on: a draw reseeded with the same seed comes out the same."""
    aug = DetectionAutoAugment("v2", reference_size=2 * W)
    outs = []
    for seed in (5, 6, 5):
        aug.set_random_seed(seed)
        outs.append([aug(_scene(seed=k)) for k in range(4)])
    for a, b in zip(outs[0], outs[2]):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(outs[0], outs[1]))
    assert aug.hparams.reference_size == 2 * W


def test_bad_policies_name_the_problem():
    with pytest.raises(VisionError, match="unknown AutoAugment operation 'Shear_BBox'"):
        DetectionAutoAugment([[["Shear_BBox", 0.5, 3]]])
    with pytest.raises(VisionError, match="unknown AutoAugment operation 'Blur'"):
        apply_operation("Blur", _scene(), 3)
    with pytest.raises(VisionError, match="unknown AutoAugment policy 'v9'"):
        DetectionAutoAugment("v9")
    with pytest.raises(VisionError, match="probability"):
        DetectionAutoAugment([[["Equalize", 1.5, 3]]])
