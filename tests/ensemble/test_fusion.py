"""vision.ensemble fusion against ensemble-boxes itself, on random and adversarial inputs."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import ensemble_boxes as eb
import numpy as np
import pytest

import vision.ensemble as ve
from vision.ensemble._sort import numba_quicksort_argsort
from vision.ensemble.masks import fuse_masks

CONF_TYPES = ["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]


def _quiet(fn, *args, **kwargs):
    """Call without ensemble-boxes' prints and warnings; copy lists, since its NMS rewrites scores in place."""
    args = [list(a) if isinstance(a, list) else a for a in args]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def assert_same(ref, ours):
    for name, r, o in zip(("boxes", "scores", "labels"), ref, ours):
        r, o = np.asarray(r), np.asarray(o)
        assert r.shape == o.shape, f"{name}: shape {r.shape} != {o.shape}"
        np.testing.assert_allclose(o, r, rtol=0, atol=1e-5, err_msg=name)


def random_models(rng, n_models=3, n_boxes=40, n_classes=4, quantise=None, jitter=0.03):
    """Models that see the same objects with jitter: real clusters, plus optional tied values."""
    centre = rng.random((n_boxes, 2))
    size = rng.uniform(0.05, 0.5, (n_boxes, 2))
    base = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    labels = rng.integers(0, n_classes, n_boxes)
    boxes, scores, labs = [], [], []
    for _ in range(n_models):
        b = base + rng.normal(0, jitter, base.shape)
        b = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], axis=1).clip(0, 1)
        s = rng.random(n_boxes)
        if quantise:
            b = np.round(b * quantise) / quantise
            s = np.round(s * quantise) / quantise
        keep = rng.random(n_boxes) < 0.9
        boxes.append(b[keep])
        scores.append(s[keep])
        labs.append(labels[keep])
    return boxes, scores, labs


CASES = [(seed, q) for seed in range(6) for q in (None, 10, 3)]


@pytest.fixture(params=["compiled", "lockstep"])
def wbf_path(request, monkeypatch):
    """Run a WBF test on both clustering paths: the Numba kernel and the NumPy lock-step fallback."""
    from vision.ensemble import _wbf

    if request.param == "compiled":
        assert _wbf.compiled_kernel() is not None, "Numba (an ensemble-boxes dependency) should be importable"
    else:
        monkeypatch.setattr(_wbf, "compiled_kernel", lambda: None)
    return request.param


def assert_bit_exact(ref, ours):
    for name, r, o in zip(("boxes", "scores", "labels"), ref, ours):
        r, o = np.asarray(r, dtype=np.float64), np.asarray(o, dtype=np.float64)
        assert r.shape == o.shape, f"{name}: shape {r.shape} != {o.shape}"
        assert np.array_equal(r, o, equal_nan=True), f"{name}: max diff {np.nanmax(np.abs(r - o))}"


@pytest.mark.parametrize("seed,quantise", CASES)
@pytest.mark.parametrize("conf_type", CONF_TYPES)
@pytest.mark.usefixtures("wbf_path")
def test_wbf_matches_ensemble_boxes(seed, quantise, conf_type):
    rng = np.random.default_rng(seed)
    b, s, lab = random_models(rng, n_models=1 + seed % 4, n_boxes=10 + 15 * seed, quantise=quantise)
    for weights in (None, [3, 1, 2, 1][: len(b)]):
        for overflow in (False, True):
            for iou_thr, skip in ((0.55, 0.0), (0.3, 0.2), (0.8, 0.5)):
                kw = dict(weights=weights, iou_thr=iou_thr, skip_box_thr=skip, conf_type=conf_type,
                          allows_overflow=overflow)
                assert_same(_quiet(eb.weighted_boxes_fusion, b, s, lab, **kw), ve.weighted_boxes_fusion(b, s, lab, **kw))


@pytest.mark.parametrize("seed,quantise", CASES)
def test_nms_and_soft_nms_match_ensemble_boxes(seed, quantise):
    rng = np.random.default_rng(100 + seed)
    b, s, lab = random_models(rng, n_models=1 + seed % 4, n_boxes=10 + 15 * seed, quantise=quantise)
    for weights in (None, [2, 1, 3, 1][: len(b)]):
        for iou_thr in (0.3, 0.5, 0.7):
            assert_same(_quiet(eb.nms, b, s, lab, iou_thr=iou_thr, weights=weights),
                        ve.nms(b, s, lab, iou_thr=iou_thr, weights=weights))
            for method in (1, 2, 3, 0):
                kw = dict(method=method, iou_thr=iou_thr, sigma=0.3, thresh=0.05, weights=weights)
                assert_same(_quiet(eb.soft_nms, b, s, lab, **kw), ve.soft_nms(b, s, lab, **kw))


@pytest.mark.usefixtures("wbf_path")
def test_many_ties_in_one_class():
    """More than 16 tied scores in a class: ensemble-boxes' sorts are not stable there."""
    rng = np.random.default_rng(7)
    b, s, lab = random_models(rng, n_models=4, n_boxes=60, n_classes=1, quantise=2, jitter=0.2)
    for i in range(len(s)):
        s[i] = np.full(len(s[i]), 0.5)
    for kw in ({}, {"iou_thr": 0.2}):
        assert_same(_quiet(eb.weighted_boxes_fusion, b, s, lab, **kw), ve.weighted_boxes_fusion(b, s, lab, **kw))
        assert_same(_quiet(eb.nms, b, s, lab, **kw), ve.nms(b, s, lab, **kw))
        assert_same(_quiet(eb.soft_nms, b, s, lab, **kw), ve.soft_nms(b, s, lab, **kw))


def test_numba_quicksort_port_matches_numba():
    numba = pytest.importorskip("numba")
    argsort = numba.njit(lambda a: np.argsort(a))
    rng = np.random.default_rng(0)
    for n in (1, 2, 15, 16, 17, 40, 200):
        for levels in (2, 5, 1000):
            a = rng.integers(0, levels, n).astype(np.float64)
            np.testing.assert_array_equal(numba_quicksort_argsort(a), argsort(a))


ADVERSARIAL = {
    "identical boxes": (
        [np.array([[0.1, 0.1, 0.5, 0.5]] * 3), np.array([[0.1, 0.1, 0.5, 0.5]] * 2)],
        [np.array([0.9, 0.9, 0.8]), np.array([0.9, 0.7])],
        [np.array([1, 1, 1]), np.array([1, 1])],
    ),
    "zero-area and swapped and outside boxes": (
        [np.array([[0.2, 0.2, 0.2, 0.6], [0.5, 0.5, 0.1, 0.1], [-0.2, 0.1, 0.4, 1.3]]),
         np.array([[0.1, 0.1, 0.5, 0.5], [0.3, 0.3, 0.3, 0.3]])],
        [np.array([0.9, 0.8, 0.7]), np.array([0.6, 0.95])],
        [np.array([0, 0, 0]), np.array([0, 0])],
    ),
    "one model empty": (
        [np.zeros((0, 4)), np.array([[0.1, 0.1, 0.4, 0.4], [0.12, 0.1, 0.4, 0.42]])],
        [np.zeros(0), np.array([0.5, 0.4])],
        [np.zeros(0, dtype=int), np.array([2, 2])],
    ),
    "single box": ([np.array([[0.1, 0.2, 0.3, 0.4]])], [np.array([0.3])], [np.array([5])]),
    "ties across classes": (
        [np.array([[0.1, 0.1, 0.4, 0.4], [0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]]),
         np.array([[0.11, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]])],
        [np.array([0.5, 0.5, 0.5]), np.array([0.5, 0.5])],
        [np.array([1, 2, 1]), np.array([2, 1])],
    ),
    "float32 inputs and float labels": (
        [np.array([[0.1, 0.1, 0.4, 0.4], [0.15, 0.1, 0.45, 0.4]], np.float32)],
        [np.array([0.8, 0.6], np.float32)],
        [np.array([1.0, 1.0], np.float32)],
    ),
}


@pytest.mark.filterwarnings("ignore:box coordinates outside")
@pytest.mark.parametrize("name", list(ADVERSARIAL))
@pytest.mark.usefixtures("wbf_path")
def test_adversarial_inputs(name):
    b, s, lab = ADVERSARIAL[name]
    for ct in CONF_TYPES:
        assert_same(_quiet(eb.weighted_boxes_fusion, b, s, lab, conf_type=ct),
                    ve.weighted_boxes_fusion(b, s, lab, conf_type=ct))
    assert_same(_quiet(eb.nms, b, s, lab), ve.nms(b, s, lab))
    for method in (1, 2, 3):
        assert_same(_quiet(eb.soft_nms, b, s, lab, method=method), ve.soft_nms(b, s, lab, method=method))


def test_all_models_empty():
    b, s, lab = [np.zeros((0, 4))] * 2, [np.zeros(0)] * 2, [np.zeros(0)] * 2
    assert_same(_quiet(eb.weighted_boxes_fusion, b, s, lab), ve.weighted_boxes_fusion(b, s, lab))
    # ensemble-boxes' NMS raises on no boxes at all ("need at least one array"); ours returns nothing.
    with pytest.raises(ValueError):
        _quiet(eb.nms, b, s, lab)
    for out in (ve.nms(b, s, lab), ve.soft_nms(b, s, lab)):
        assert [len(x) for x in out] == [0, 0, 0]
        assert out[0].shape == (0, 4)


def test_signatures_match_ensemble_boxes():
    import inspect

    for name in ("nms", "soft_nms", "nms_method", "weighted_boxes_fusion"):
        ref = inspect.signature(getattr(eb, name))
        ours = inspect.signature(getattr(ve, name))
        assert list(ref.parameters) == list(ours.parameters), name
        assert [p.default for p in ref.parameters.values()] == [p.default for p in ours.parameters.values()], name


def test_inputs_not_modified():
    b, s, lab = random_models(np.random.default_rng(3))
    s_before = [x.copy() for x in s]
    ve.nms(b, s, lab, weights=[1, 2, 3])
    for x, y in zip(s, s_before):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("chunk", [None, 40])
@pytest.mark.parametrize("method", ["wbf", "nms", "soft_nms", "sum"])
@pytest.mark.usefixtures("wbf_path")
def test_batch_equals_single_images(method, chunk, monkeypatch):
    if chunk is not None:  # force fuse_batch to split the images into several chunks
        monkeypatch.setattr("vision.ensemble.fusion._CHUNK_BOXES", chunk)
    rng = np.random.default_rng(11)
    images = [random_models(rng, n_boxes=int(rng.integers(1, 30))) for _ in range(6)]
    images.append(([np.zeros((0, 4))] * 3, [np.zeros(0)] * 3, [np.zeros(0, dtype=int)] * 3))
    batch = ve.fuse_batch(images, method, weights=[1, 2, 1], skip_box_thr=0.1)
    for im, f in zip(images, batch):
        g = ve.fuse(*im, method=method, weights=[1, 2, 1], skip_box_thr=0.1)
        assert_same((g.boxes, g.scores, g.labels), (f.boxes, f.scores, f.labels))
        for x, y in zip(f.members, g.members):
            np.testing.assert_array_equal(x, y)


def test_wbf_members_rebuild_fused_boxes():
    """Each fused box is the score-weighted mean of the boxes ``members`` assigns to it."""
    rng = np.random.default_rng(5)
    b, s, lab = random_models(rng, n_models=3, n_boxes=30)
    f = ve.fuse(b, s, lab, "wbf", weights=[2, 1, 1])
    w = [2, 1, 1]
    for j in range(len(f.scores)):
        coords = np.concatenate([b[t][f.members[t] == j] for t in range(3)])
        weights = np.concatenate([s[t][f.members[t] == j] * w[t] for t in range(3)])
        assert len(coords) >= 1
        np.testing.assert_allclose(f.boxes[j], weights @ coords / weights.sum(), atol=1e-6)
        assert {int(x) for t in range(3) for x in lab[t][f.members[t] == j]} == {int(f.labels[j])}


def naive_score_sum(boxes, scores, labels, iou_thr, weights):
    """Plain-loop score-sum NMS written from the definition."""
    items = []
    for t, (bb, ss, ll) in enumerate(zip(boxes, scores, labels)):
        for b, s, lab in zip(bb, ss, ll):
            items.append((lab, s * weights[t] / sum(weights), tuple(b)))
    out = []
    for lab in sorted({i[0] for i in items}):
        group = sorted([i for i in items if i[0] == lab], key=lambda i: -i[1])
        kept = []
        for _, s, b in group:
            for k in kept:
                x1, y1 = max(b[0], k[0][0]), max(b[1], k[0][1])
                x2, y2 = min(b[2], k[0][2]), min(b[3], k[0][3])
                inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
                union = (b[2] - b[0]) * (b[3] - b[1]) + (k[0][2] - k[0][0]) * (k[0][3] - k[0][1]) - inter
                if inter / union > iou_thr:
                    k[1] += s
                    break
            else:
                kept.append([b, s])
        out += [(k[0], min(k[1], 1.0), lab) for k in kept]
    out.sort(key=lambda o: -o[1])
    return np.array([o[0] for o in out]), np.array([o[1] for o in out]), np.array([o[2] for o in out])


def test_score_sum_nms_against_plain_loops():
    rng = np.random.default_rng(21)
    b, s, lab = random_models(rng, n_models=3, n_boxes=25)
    got = ve.score_sum_nms(b, s, lab, iou_thr=0.4, weights=[2, 1, 1])
    assert_same(naive_score_sum(b, s, lab, 0.4, [2, 1, 1]), got)


def test_score_sum_nms_hand_example():
    boxes = [np.array([[0.1, 0.1, 0.5, 0.5]]), np.array([[0.1, 0.1, 0.5, 0.52], [0.6, 0.6, 0.9, 0.9]])]
    scores = [np.array([0.8]), np.array([0.6, 0.4])]
    labels = [np.array([1]), np.array([1, 1])]
    b, s, labs = ve.score_sum_nms(boxes, scores, labels, iou_thr=0.5)
    np.testing.assert_array_equal(labs, [1, 1])
    np.testing.assert_allclose(s, [(0.8 + 0.6) / 2, 0.4 / 2])
    np.testing.assert_allclose(b, [[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]])


def test_fuse_masks_hand_example():
    # Two models agree on one object; model 0 also has a lone object.
    boxes = [np.array([[0.1, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]]), np.array([[0.1, 0.1, 0.5, 0.5]])]
    scores = [np.array([0.75, 0.5]), np.array([0.25])]
    labels = [np.array([0, 0]), np.array([0])]
    masks = [np.array([[[1, 1], [0, 0]], [[0, 0], [0, 1]]]), np.array([[[1, 0], [1, 0]]])]
    f = ve.fuse(boxes, scores, labels, "wbf")
    out = fuse_masks(masks, scores, f.members, len(f.scores))
    first = int(np.argmax(f.scores))  # the agreed object
    # (0.75 * [[1,1],[0,0]] + 0.25 * [[1,0],[1,0]]) / 1.0
    np.testing.assert_allclose(out[first], [[1.0, 0.75], [0.25, 0.0]])
    np.testing.assert_allclose(out[1 - first], [[0, 0], [0, 1]])
    # Model weights scale the members: weight 3 on model 1 gives (0.75 m0 + 0.75 m1) / 1.5.
    f = ve.fuse(boxes, scores, labels, "wbf", weights=[1, 3])
    out = fuse_masks(masks, scores, f.members, len(f.scores), weights=[1, 3])
    first = int(np.argmax(f.scores))
    np.testing.assert_allclose(out[first], [[1.0, 0.5], [0.5, 0.0]])


def test_wrong_number_of_weights_and_bad_conf_type():
    b, s, lab = random_models(np.random.default_rng(8))
    with pytest.warns(UserWarning, match="incorrect number of weights"):
        ours = ve.weighted_boxes_fusion(b, s, lab, weights=[1, 2])
    assert_same(_quiet(eb.weighted_boxes_fusion, b, s, lab, weights=[1, 2]), ours)  # both fall back to 1s
    with pytest.warns(UserWarning, match="incorrect number of weights"):
        ours = ve.nms(b, s, lab, weights=[1, 2])
    assert_same(_quiet(eb.nms, b, s, lab, weights=[1, 2]), ours)  # both ignore the weights
    with pytest.raises(ValueError, match="conf_type"):
        ve.weighted_boxes_fusion(b, s, lab, conf_type="median")
    with pytest.raises(ValueError, match="model 0"):
        ve.weighted_boxes_fusion([b[0]], [s[0][:-1]], [lab[0]])


def test_soft_nms_decayed_scores_hand_example():
    # Two boxes with IoU 0.6 (0.4 x 0.5 boxes offset by 0.1 in x: overlap 0.3 x 0.5 = 0.15, union 0.25).
    boxes = [np.array([[0.1, 0.1, 0.5, 0.6]]), np.array([[0.2, 0.1, 0.6, 0.6]])]
    scores = [np.array([0.9]), np.array([0.8])]
    labels = [np.array([0]), np.array([0])]
    f = ve.fuse(boxes, scores, labels, "soft_nms", soft_method=2, sigma=0.5, decayed_scores=True)
    np.testing.assert_allclose(f.scores, [0.9, 0.8 * np.exp(-0.36 / 0.5)])
    f = ve.fuse(boxes, scores, labels, "soft_nms", soft_method=1, iou_thr=0.5, decayed_scores=True)
    np.testing.assert_allclose(f.scores, [0.9, 0.8 * (1 - 0.6)])
    # ensemble-boxes (and the drop-in) return the original scores of the kept boxes.
    np.testing.assert_allclose(ve.soft_nms(boxes, scores, labels)[1], [0.9, 0.8])


@pytest.mark.usefixtures("wbf_path")
def test_labels_beyond_float32_precision():
    """ensemble-boxes stores a multi-box cluster's label as float32; 2**24 + 1 then no longer matches."""
    rng = np.random.default_rng(4)
    b, s, _ = random_models(rng, n_models=3, n_boxes=12, n_classes=1)
    lab = [np.full(len(x), 2**24 + 1) for x in s]
    assert_same(_quiet(eb.weighted_boxes_fusion, b, s, lab), ve.weighted_boxes_fusion(b, s, lab))


@pytest.mark.parametrize("seed", range(4))
def test_wbf_is_bit_exact_including_zero_scores(seed, wbf_path):
    """Same float32 roundings and operation order as ensemble-boxes: identical bits, not just close.
    Zero scores make 0/0 fused boxes (NaN), which ensemble-boxes then matches first, as NumPy's argmax does."""
    rng = np.random.default_rng(100 + seed)
    b, s, lab = random_models(rng, n_models=4, n_boxes=80, n_classes=3, quantise=3 if seed % 2 else None)
    if seed >= 2:
        for x in s:
            x[rng.random(len(x)) < 0.3] = 0.0
    for ct in CONF_TYPES:
        for iou_thr in (0.55, 0.3):
            kw = dict(weights=[1, 2, 1, 3], iou_thr=iou_thr, conf_type=ct)
            assert_bit_exact(_quiet(eb.weighted_boxes_fusion, b, s, lab, **kw), ve.weighted_boxes_fusion(b, s, lab, **kw))


def test_numba_kernel_without_a_writable_cache_folder(tmp_path):
    """Where Numba finds no folder to cache compiled code in (read-only package folder and HOME), the kernel
    is compiled in memory instead of the import failing.  As root ignores read-only permissions, the folders
    are made unusable by a file standing where each folder would be created."""
    import os
    import shutil
    import subprocess
    import sys

    pkg = tmp_path / "site"
    shutil.copytree(Path(ve.__file__).parents[1], pkg / "vision", ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "vision" / "ensemble" / "__pycache__").write_text("not a folder")
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(PYTHONPATH=str(pkg), HOME=str(blocker / "home"), XDG_CACHE_HOME=str(blocker / "cache"),
               VISION_NUMBA="1", PYTHONDONTWRITEBYTECODE="1")
    code = (
        "import numpy as np, vision.ensemble as ve\n"
        "from vision.ensemble import _wbf\n"
        f"assert ve.__file__.startswith({str(pkg)!r}), ve.__file__\n"
        "assert _wbf.compiled_kernel() is not None\n"
        "b = [np.array([[0.1, 0.1, 0.5, 0.5], [0.11, 0.1, 0.5, 0.52]]), np.array([[0.1, 0.12, 0.5, 0.5]])]\n"
        "s = [np.array([0.9, 0.4]), np.array([0.7])]\n"
        "lab = [np.array([1, 1]), np.array([1])]\n"
        "boxes, scores, labels = ve.weighted_boxes_fusion(b, s, lab)\n"
        "print(repr(boxes.tolist()), repr(scores.tolist()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    b = [np.array([[0.1, 0.1, 0.5, 0.5], [0.11, 0.1, 0.5, 0.52]]), np.array([[0.1, 0.12, 0.5, 0.5]])]
    s = [np.array([0.9, 0.4]), np.array([0.7])]
    lab = [np.array([1, 1]), np.array([1])]
    ref = _quiet(eb.weighted_boxes_fusion, b, s, lab)
    assert r.stdout.strip() == f"{ref[0].tolist()!r} {ref[1].tolist()!r}"
