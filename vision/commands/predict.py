"""``vision predict``: batch inference over a folder, glob or list file of images."""

from __future__ import annotations

import argparse

from vision.errors import VisionError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", nargs="+", required=True, help="vision checkpoint(s), or a state_dict with --config")
    parser.add_argument("--source", required=True, help="image folder (recursive), glob, list file or one image")
    parser.add_argument("--out", required=True, help="output folder; re-running with it skips images already done")
    parser.add_argument("--config", help="config for a plain torchvision state_dict")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation: horizontal flip and multi-scale")
    parser.add_argument("--tta-scales", type=float, nargs="+", default=[0.8, 1.0, 1.2], help="TTA image scales")
    parser.add_argument("--fusion", choices=["nms", "soft_nms", "wbf", "sum"], default="wbf",
                        help="how models (and TTA views) are fused")
    parser.add_argument("--model-weights", type=float, nargs="+", help="one weight per --weights model")
    parser.add_argument("--iou", type=float, help="fusion IoU threshold (default: the method's)")
    parser.add_argument("--skip-score", type=float, default=0.0, help="boxes scoring below it are dropped before fusion")
    parser.add_argument("--hierarchy", help="class hierarchy JSON: each detection also yields its ancestor classes")
    parser.add_argument("--hierarchy-merge", choices=["nms", "soft_nms", "wbf", "sum", "none"], default="nms",
                        help="how overlapping copies of one parent class are merged")
    parser.add_argument("--csv", action="store_true", help="also write predictions.csv")
    parser.add_argument("--save-images", action="store_true", help="also write each image with its detections drawn")
    parser.add_argument("--draw-thresh", type=float, default=None,
                        help="score a detection needs to be drawn (default 0.5; the results keep every detection)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="decoding worker processes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="float16 (CUDA) / bfloat16 (CPU) inference")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="compute precision (default fp32; bf16 needs a CPU with native bfloat16 or a GPU)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the backbone and dense heads ahead of time (once for every image size;"
                             " the packages are kept in $VISION_COMPILE_CACHE or ~/.cache/vision/compiled)")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="images per forward pass (default: 1 on CPU, 8 on CUDA)")
    parser.add_argument("--plain", action="store_true",
                        help="run the model exactly as trained (no batch-norm folding, no channels_last)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the predictions --out holds if other weights, settings or images made them")
    parser.add_argument("--shard", default="0/1", metavar="K/N",
                        help="predict only the K-th of N shares of the images still to do (several processes, one --out)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. model.score_thresh=0.3")


def engine_options(args: argparse.Namespace):
    """The inference engine settings these arguments ask for."""
    from vision.inference.engine import EngineOptions

    engine = EngineOptions.plain() if args.plain else EngineOptions()
    engine.compile = bool(args.compile)
    engine.micro_batch = max(0, int(args.micro_batch))
    return engine


def refuse_inapplicable(args: argparse.Namespace, task: object, weights: str) -> None:
    """A flag the checkpoint's task would ignore is an error, not a silent no-op."""
    refused = getattr(task, "refused_options", {})
    given = [k for k, unset in refused.items() if getattr(args, k, unset) != unset]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise VisionError(f"{weights} is a {task.name} model, which {flags} cannot be used with")


def _shard(spec: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise VisionError(f"--shard {spec}: expected K/N, e.g. 0/2") from None
    if not (n >= 1 and 0 <= k < n):
        raise VisionError(f"--shard {spec}: expected K/N with 0 <= K < N")
    return k, n


def run(args: argparse.Namespace) -> int:
    from vision.api import load
    from vision.runtime.device import select_device
    from vision.runtime.distributed import cleanup, dist_info, init_distributed

    if args.batch_size < 1:
        raise VisionError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.workers < 0:
        raise VisionError(f"--workers {args.workers}: must be 0 or more")
    shard = _shard(args.shard)
    init_distributed(select_device(args.device))
    try:
        model = load(
            args.weights, config=args.config, overrides=args.overrides, device=args.device, precision=args.precision,
            amp=args.amp, tta=args.tta, tta_scales=args.tta_scales, fusion=args.fusion, iou=args.iou,
            skip_score=args.skip_score, model_weights=args.model_weights, engine=engine_options(args),
        )
        refuse_inapplicable(args, model.task, str(args.weights[0]))
        summary, written = model.predict_folder(
            args.source, args.out, batch_size=args.batch_size, workers=args.workers, save_images=args.save_images,
            draw_thresh=args.draw_thresh, write_csv=args.csv, hierarchy=args.hierarchy,
            hierarchy_merge=None if args.hierarchy_merge == "none" else args.hierarchy_merge,
            overwrite=args.overwrite, shard=shard,
        )
        if dist_info().is_main:
            for line in summary.skipped:
                print(f"skipped {line}")
            models = f" with {len(args.weights)} model(s){' + TTA' if args.tta else ''}"
            counted = "detections" if model.task.name == "detection" else ""
            print(summary.line("predicted", models, counted, written))
    finally:
        cleanup()
    return 0
