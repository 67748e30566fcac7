"""Speed of vision.ensemble against ensemble-boxes, with a check that the outputs are equal.

Each image has 5 models x 300 boxes over 80 classes: 300 objects with random classes, each model
seeing every object with its own jitter and score (10% of a model's labels are wrong), so clusters
look like a real ensemble's.  Both libraries run in this process on the same inputs; for every image
the boxes, scores and labels must agree within 1e-5 (exit status 1 otherwise).

One line per method, the last one WBF: CPU milliseconds per image for ensemble-boxes, for our drop-in
called image by image (the two alternate image by image, so load from other processes hits both
alike) and for ``fuse_batch`` over all images at once (what ``vision fuse`` uses), with the ratios.

    python benchmarks/fusion.py [--images 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
import warnings

import ensemble_boxes
import numpy as np

import vision.ensemble as ve


def make_image(rng: np.random.Generator, models: int, boxes: int, classes: int):
    centre = rng.random((boxes, 2))
    size = rng.uniform(0.02, 0.4, (boxes, 2))
    base = np.concatenate([centre - size / 2, centre + size / 2], axis=1).clip(0, 1)
    labels = rng.integers(0, classes, boxes)
    bl, sl, ll = [], [], []
    for _ in range(models):
        jitter = rng.normal(0, 0.02, base.shape) * np.tile(size, 2)
        b = (base + jitter).clip(0, 1)
        b = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], axis=1)
        lab = labels.copy()
        wrong = rng.random(boxes) < 0.1
        lab[wrong] = rng.integers(0, classes, wrong.sum())
        bl.append(b)
        sl.append(rng.random(boxes))
        ll.append(lab)
    return bl, sl, ll


def equal(a, b) -> bool:
    return all(
        np.shape(x) == np.shape(y) and np.allclose(x, y, rtol=0, atol=1e-5) for x, y in zip(a, b)
    )


def timed_pair(ref_fn, our_fn, images, kwargs):
    """Time both libraries image by image, alternating, so a load spike on this shared machine hits
    both alike.  CPU time of this process (not wall time), so other processes' work does not count."""
    t_ref = t_our = 0.0
    ref, ours = [], []
    ref_fn(*images[0], **kwargs)  # warm up (ensemble-boxes' NMS is compiled by Numba on first call)
    our_fn(*images[0], **kwargs)
    for i, (bl, sl, ll) in enumerate(images):
        # ensemble-boxes' NMS rewrites the score list in place when weighted; hand each call a copy.
        for fn in (ref_fn, our_fn) if i % 2 == 0 else (our_fn, ref_fn):
            t0 = time.process_time()
            r = fn(list(bl), list(sl), list(ll), **kwargs)
            dt = time.process_time() - t0
            if fn is ref_fn:
                t_ref += dt
                ref.append(r)
            else:
                t_our += dt
                ours.append(r)
    return t_ref, t_our, ref, ours


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--boxes", type=int, default=300)
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", help="only these cases (e.g. wbf 'soft_nms linear')")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    images = [make_image(rng, args.models, args.boxes, args.classes) for _ in range(args.images)]
    weights = [2, 1, 1, 1, 1][: args.models] + [1] * max(0, args.models - 5)
    # (name, ensemble-boxes function, our drop-in, keyword arguments, our batched method and options)
    cases = [
        ("nms", ensemble_boxes.nms, ve.nms, {"iou_thr": 0.5, "weights": weights}, ("nms", {})),
        ("soft_nms linear", ensemble_boxes.soft_nms, ve.soft_nms, {"method": 1, "iou_thr": 0.5, "thresh": 0.1},
         ("soft_nms", {"soft_method": 1, "thresh": 0.1})),
        ("soft_nms gaussian", ensemble_boxes.soft_nms, ve.soft_nms, {"method": 2, "sigma": 0.5, "thresh": 0.1},
         ("soft_nms", {"soft_method": 2, "sigma": 0.5, "thresh": 0.1})),
        ("wbf", ensemble_boxes.weighted_boxes_fusion, ve.weighted_boxes_fusion,
         {"iou_thr": 0.55, "skip_box_thr": 0.0, "weights": weights}, ("wbf", {})),
    ]
    if args.methods:
        cases = [c for c in cases if c[0] in args.methods]
    n = len(images)
    print(f"{n} images x {args.models} models x {args.boxes} boxes x {args.classes} classes; "
          "CPU ms per image; 'per call' = the drop-in called image by image, 'batched' = fuse_batch on all images")
    failed = False
    for name, ref_fn, our_fn, kwargs, (method, options) in cases:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            t_ref, t_our, ref, ours = timed_pair(ref_fn, our_fn, images, kwargs)
            t0 = time.process_time()
            batched = ve.fuse_batch(
                images, method, kwargs.get("weights"), kwargs.get("iou_thr"), kwargs.get("skip_box_thr", 0.0),
                **options,
            )
            t_batch = time.process_time() - t0
        n_equal = sum(equal(a, b) and equal(a, (f.boxes, f.scores, f.labels)) for a, b, f in zip(ref, ours, batched))
        failed |= n_equal != n
        print(
            f"{name}: ensemble-boxes {1000 * t_ref / n:.2f}; vision per call {1000 * t_our / n:.2f} "
            f"({t_ref / t_our:.1f}x), batched {1000 * t_batch / n:.2f} ({t_ref / t_batch:.1f}x); "
            f"outputs equal on {n_equal}/{n} images",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
