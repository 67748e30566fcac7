"""Samplers: class balance measured over 100k draws, LVIS repeat factors by hand, DDP shards, resume."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from torch.utils.data import DistributedSampler

from vision.data.samplers import build_sampler
from vision.errors import ConfigError, VisionError

DRAWS = 100_000


def _long_tail_single_class() -> list[np.ndarray]:
    """Five classes on 1000, 200, 50, 10 and 1 images (1000:1), one class per image, plus empty images."""
    rng = np.random.default_rng(0)
    labels = []
    for cls, n in zip(range(1, 6), (1000, 200, 50, 10, 1)):
        labels += [np.full(rng.integers(1, 4), cls, np.int64) for _ in range(n)]
    labels += [np.zeros(0, np.int64)] * 20
    order = rng.permutation(len(labels))
    return [labels[i] for i in order]


def _contains(labels_per_image: list[np.ndarray], classes: list[int]) -> np.ndarray:
    """[num_images, num_classes] booleans: does the image hold at least one instance of the class."""
    return np.array([[c in set(labels.tolist()) for c in classes] for labels in labels_per_image])


def _fractions(sampler, labels_per_image, classes) -> np.ndarray:
    draws = np.fromiter(iter(sampler), np.int64)
    return _contains(labels_per_image, classes)[draws].mean(0)


def test_class_balanced_equalizes_classes_spanning_1000_to_1():
    labels = _long_tail_single_class()
    classes = [1, 2, 3, 4, 5]
    sampler = build_sampler("class_balanced", labels, epoch_length=DRAWS, seed=1)
    assert len(sampler) == DRAWS
    frac = _fractions(sampler, labels, classes)
    assert np.abs(frac - frac.mean()).max() < 0.1 * frac.mean(), frac
    # the uniform share of the rarest class is 1/1281; balanced, it is about 1/5
    uniform = _fractions(build_sampler("uniform", labels), labels, classes)
    assert uniform[-1] < 0.001 and frac[-1] > 0.18
    # images without instances can never be drawn
    empty = {i for i, lab in enumerate(labels) if len(lab) == 0}
    assert not empty & set(iter(sampler))


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_class_power_draws_classes_in_proportion_to_image_counts_to_the_power(power):
    """With one class per image, each class's share of draws is n(c)^p / sum n^p (within 10%)."""
    labels = _long_tail_single_class()
    classes = [1, 2, 3, 4, 5]
    counts = np.array([1000, 200, 50, 10, 1], np.float64)
    expected = counts**power / (counts**power).sum()
    sampler = build_sampler("class_balanced", labels, epoch_length=DRAWS, seed=3, class_power=power)
    np.testing.assert_allclose(sampler.class_probs, expected, rtol=1e-12)
    frac = _fractions(sampler, labels, classes)
    tol = np.maximum(0.1 * expected, 4 * np.sqrt(expected / DRAWS))  # the rarest share at p=1 is 1/1261
    assert (np.abs(frac - expected) < tol).all(), (frac, expected)
    # square-root sampling sits between balanced and the data's own mix for the rarest class
    if power == 0.5:
        uniform = _fractions(build_sampler("uniform", labels), labels, classes)
        assert uniform[-1] < frac[-1] < 0.1


def test_class_power_zero_is_the_plain_class_balanced_sampler():
    labels = _long_tail_single_class()
    a = list(build_sampler("class_balanced", labels, epoch_length=500, seed=9))
    b = list(build_sampler("class_balanced", labels, epoch_length=500, seed=9, class_power=0.0))
    assert a == b
    with pytest.raises(ConfigError, match="class_power"):
        build_sampler("class_balanced", labels, class_power=1.5)


def _check_shared_images(labels: list[np.ndarray], classes: list[int]) -> np.ndarray:
    """On images holding several classes each, every class is drawn at least as often as uniformly."""
    contains = _contains(labels, classes)
    share = contains.mean(0)  # exact uniform-draw share of each class
    frac = _fractions(build_sampler("class_balanced", labels, epoch_length=DRAWS, seed=2), labels, classes)
    tol = 3 * np.sqrt(frac * (1 - frac) / DRAWS) + 1e-3
    assert (frac >= share - tol).all(), (frac, share)
    # picking class c always yields an image holding c, so each class gets at least 1/K of the draws
    assert (frac >= 1 / len(classes) - tol).all()
    rarest = int(np.argmin(share))
    assert frac[rarest] > share[rarest] + 0.05, (frac, share)
    return frac


def test_class_balanced_on_bccd_like_shared_images():
    """About 11 RBC, 1 WBC and 1 platelet per image, in varying combinations."""
    rng = np.random.default_rng(3)
    labels = []
    for _ in range(364):
        rbc = 0 if rng.random() < 0.03 else rng.poisson(11)
        wbc = rng.choice([0, 1, 2], p=[0.05, 0.9, 0.05])
        plt = rng.choice([0, 1, 2], p=[0.35, 0.45, 0.2])
        labels.append(np.array([1] * rbc + [2] * wbc + [3] * plt, np.int64))
    _check_shared_images(labels, [1, 2, 3])


def test_class_balanced_on_bccd_labels(shared_data):
    folder = shared_data / "bccd" / "Annotations"
    if not folder.is_dir():
        pytest.skip("BCCD not present")
    names = {"RBC": 1, "WBC": 2, "Platelets": 3}
    labels = []
    for xml in sorted(folder.glob("*.xml")):
        objects = ET.parse(xml).getroot().iter("object")
        labels.append(np.array([names[o.findtext("name").strip()] for o in objects], np.int64))
    assert len(labels) > 300
    _check_shared_images(labels, [1, 2, 3])


def test_class_cap_limits_distinct_images_per_class():
    labels = _long_tail_single_class()
    sampler = build_sampler("class_balanced", labels, epoch_length=20_000, class_cap=7, seed=4)
    draws = np.array(list(sampler))
    for cls in (1, 2, 3, 4):
        drawn = {int(i) for i in draws if cls in labels[i]}
        assert len(drawn) == 7
    # the subset is a function of the seed, the same in every epoch and every process
    again = build_sampler("class_balanced", labels, epoch_length=20_000, class_cap=7, seed=4)
    again.set_epoch(5)
    assert {c: v.tolist() for c, v in again.class_images.items()} == {
        c: v.tolist() for c, v in sampler.class_images.items()}
    assert set(np.array(list(again)).tolist()) == set(draws.tolist())
    other = build_sampler("class_balanced", labels, epoch_length=20_000, class_cap=7, seed=5)
    assert other.class_images[1].tolist() != sampler.class_images[1].tolist()


def _lvis_labels() -> list[np.ndarray]:
    return [np.array([1])] * 6 + [np.array([2, 1]), np.array([2, 2]), np.array([3]), np.zeros(0, np.int64)]


def test_repeat_factors_match_the_lvis_formula():
    # f(1) = 7/10, f(2) = 2/10, f(3) = 1/10 and t = 0.4: r(1) = 1, r(2) = sqrt(2), r(3) = 2
    sampler = build_sampler("repeat_factor", _lvis_labels(), repeat_threshold=0.4)
    expected = [1.0] * 6 + [1.4142135623730951, 1.4142135623730951, 2.0, 1.0]
    np.testing.assert_allclose(sampler.repeat_factors, expected, rtol=0, atol=1e-12)
    counts = np.stack([sampler.repeats(e) for e in range(4000)])
    assert (counts[:, :6] == 1).all() and (counts[:, 8] == 2).all() and (counts[:, 9] == 1).all()
    assert set(np.unique(counts[:, 6:8]).tolist()) == {1, 2}
    np.testing.assert_allclose(counts[:, 6:8].mean(0), math.sqrt(2), atol=0.03)
    # an epoch draws each image exactly as often as its rounded repeat factor says
    for epoch in (0, 1, 2):
        sampler.set_epoch(epoch)
        drawn = np.bincount(list(sampler), minlength=10)
        np.testing.assert_array_equal(drawn, sampler.repeats(epoch))


def test_repeat_factor_threshold_zero_is_uniform():
    sampler = build_sampler("repeat_factor", _lvis_labels(), repeat_threshold=0.0)
    assert (sampler.repeat_factors == 1).all() and sorted(sampler) == list(range(10))


@pytest.mark.parametrize("n", [40, 41])
def test_uniform_matches_torch_distributed_sampler(n):
    labels = [np.array([1])] * n
    for rank in (0, 1, 2):
        ours = build_sampler("uniform", labels, num_replicas=3, rank=rank, seed=7)
        ref = DistributedSampler(range(n), num_replicas=3, rank=rank, seed=7)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(ours) == list(ref) and len(ours) == len(ref)


def test_uniform_ranks_never_share_an_index():
    labels = [np.array([1])] * 64
    shards = []
    for rank in (0, 1):
        s = build_sampler("uniform", labels, num_replicas=2, rank=rank, seed=3)
        s.set_epoch(2)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1]) == 32
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(64))


@pytest.mark.parametrize("kind", ["class_balanced", "repeat_factor"])
def test_weighted_ranks_take_disjoint_positions_of_one_order(kind):
    labels = _long_tail_single_class()
    kwargs = {"epoch_length": 1001, "repeat_threshold": 0.05, "seed": 9}
    full = build_sampler(kind, labels, **kwargs)
    full.set_epoch(4)
    order = list(full)
    shards = []
    for rank in (0, 1):
        s = build_sampler(kind, labels, num_replicas=2, rank=rank, **kwargs)
        s.set_epoch(4)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1]) == math.ceil(len(order) / 2)
    padded = order + order[: 2 * len(shards[0]) - len(order)]
    assert shards[0] == padded[0::2] and shards[1] == padded[1::2]


@pytest.mark.parametrize("kind", ["uniform", "class_balanced", "repeat_factor"])
def test_set_epoch_reshuffles_and_is_a_function_of_seed_and_epoch(kind):
    labels = _long_tail_single_class()
    a = build_sampler(kind, labels, seed=11, repeat_threshold=0.05)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert first != second
    b = build_sampler(kind, labels, seed=11, repeat_threshold=0.05)
    b.set_epoch(1)
    assert list(b) == second
    c = build_sampler(kind, labels, seed=12, repeat_threshold=0.05)
    c.set_epoch(1)
    assert list(c) != second


@pytest.mark.parametrize("kind", ["uniform", "class_balanced", "repeat_factor"])
def test_resume_with_start_continues_the_epoch_exactly(kind):
    labels = _long_tail_single_class()
    for rank in (0, 1):
        s = build_sampler(kind, labels, num_replicas=2, rank=rank, seed=5, repeat_threshold=0.05)
        s.set_epoch(6)
        full = list(s)
        resumed = build_sampler(kind, labels, num_replicas=2, rank=rank, seed=5, repeat_threshold=0.05)
        resumed.set_epoch(6, start=123)
        assert list(resumed) == full[123:]
        assert len(resumed) == len(full)


def test_uniform_without_shuffle_keeps_file_order():
    s = build_sampler("uniform", [np.array([1])] * 7, shuffle=False, num_replicas=2, rank=1)
    assert list(s) == [1, 3, 5, 0]


def test_bad_sampler_arguments_are_one_line_errors():
    labels = [np.array([1])]
    with pytest.raises(ConfigError, match=r"unknown data\.sampler 'balanced'"):
        build_sampler("balanced", labels)
    with pytest.raises(ConfigError, match="class_cap"):
        build_sampler("class_balanced", labels, class_cap=0)
    with pytest.raises(VisionError, match="at least one image with instances"):
        build_sampler("class_balanced", [np.zeros(0, np.int64)])
