"""vision.ensemble.detections: whole results files fused from columns equal ensemble-boxes image by image."""

from __future__ import annotations

import contextlib
import io
import warnings

import ensemble_boxes as eb
import numpy as np
import pytest

from vision.ensemble import fusion
from vision.ensemble.detections import Detections, ImageTable, fuse_detections


def _models(rng, images: ImageTable, n_models: int):
    models = []
    for _ in range(n_models):
        ids, boxes = [], []
        for i, (w, h) in enumerate(zip(images.width, images.height)):
            n = int(rng.integers(0, 30)) if i % 4 else 0  # every fourth image has no detections
            xy = rng.random((n, 2)) * [w, h]
            boxes.append(np.concatenate([xy, rng.random((n, 2)) * [w, h] / 3], axis=1))
            ids.append(np.full(n, images.ids[i]))
        ids = np.concatenate(ids)
        perm = rng.permutation(ids.size)  # files need not be grouped by image
        score = rng.random(ids.size)
        score[rng.random(ids.size) < 0.1] = 0.0
        models.append(Detections(ids[perm], rng.integers(1, 4, ids.size), np.concatenate(boxes)[perm], score))
    return models


@pytest.mark.parametrize("conf_type", ["avg", "max", "box_and_model_avg", "absent_model_aware_avg"])
@pytest.mark.parametrize("chunk", [50, 100_000])
def test_fuse_detections_wbf_equals_ensemble_boxes(monkeypatch, conf_type, chunk):
    monkeypatch.setattr(fusion, "_CHUNK_BOXES", chunk)
    rng = np.random.default_rng(3)
    images = ImageTable(np.arange(40, 0, -1), rng.integers(30, 900, 40).astype(float),
                        rng.integers(30, 900, 40).astype(float))
    models = _models(rng, images, 3)
    weights = [1.0, 3.0, 2.0]
    got, n_bad = fuse_detections(models, images, "wbf", weights, 0.5, 0.05, conf_type=conf_type)
    ref_rows = []
    for i, image_id in enumerate(images.ids.tolist()):
        w, h = images.width[i], images.height[i]
        bl, sl, ll = [], [], []
        for m in models:
            sel = m.image_id == image_id
            b = m.bbox[sel].copy()
            b[:, 2:] += b[:, :2]
            bl.append(b / [w, h, w, h])
            sl.append(m.score[sel])
            ll.append(m.category_id[sel])
        if sum(len(s) for s in sl) == 0:
            continue
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            b, s, lab = eb.weighted_boxes_fusion(bl, sl, ll, weights=weights, iou_thr=0.5, skip_box_thr=0.05,
                                                 conf_type=conf_type)
        for (x1, y1, x2, y2), sc, c in zip(b, s, lab):
            ref_rows.append((image_id, int(c), sc, x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h))
    ref = np.array(ref_rows, dtype=np.float64).reshape(-1, 7)
    finite = np.isfinite(ref).all(axis=1)
    assert n_bad == int((~finite).sum())
    ref = ref[finite]
    ours = np.column_stack([got.image_id, got.category_id, got.score, got.bbox])
    np.testing.assert_array_equal(ours, ref)  # bit for bit, in ensemble-boxes' output order
