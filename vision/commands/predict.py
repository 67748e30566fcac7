"""``vision predict``: batch inference over a folder, glob or list file of images."""

from __future__ import annotations

import argparse
from pathlib import Path

from vision.data.image_io import list_images
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
    parser.add_argument("--draw-thresh", type=float, default=0.3, help="score needed to be drawn")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="decoding worker processes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="float16 (CUDA) / bfloat16 (CPU) inference")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                        help="compute precision (default fp32; bf16 needs a CPU with native bfloat16 or a GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone and dense heads (a compile per new image size)")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="images per forward pass (default: 1 on CPU, 8 on CUDA)")
    parser.add_argument("--plain", action="store_true",
                        help="run the model exactly as trained (no batch-norm folding, no channels_last)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. model.score_thresh=0.3")


def engine_options(args: argparse.Namespace):
    """The inference engine settings these arguments ask for."""
    from vision.inference.engine import EngineOptions

    engine = EngineOptions.plain() if args.plain else EngineOptions()
    engine.compile = bool(args.compile)
    engine.micro_batch = max(0, int(args.micro_batch))
    if args.precision:
        engine.precision = args.precision
    return engine


# Options that only detectors use, with the value that means "not given".
DETECTION_ONLY = {
    "tta": False, "tta_scales": [0.8, 1.0, 1.2], "fusion": "wbf", "model_weights": None, "iou": None,
    "skip_score": 0.0, "hierarchy": None, "hierarchy_merge": "nms", "draw_thresh": 0.3,
}
# ... and what each other task refuses on top of those (a classifier draws nothing; masks have no CSV)
REFUSED_BY_TASK = {"classifier": {"save_images": False}, "semantic segmentation": {"csv": False}}


def refuse_inapplicable(args: argparse.Namespace, task: str) -> None:
    """A flag the checkpoint's task would ignore is an error, not a silent no-op."""
    refused = {**DETECTION_ONLY, **REFUSED_BY_TASK.get(task, {})}
    given = [k for k, unset in refused.items() if getattr(args, k, unset) != unset]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise VisionError(f"{args.weights[0]} is a {task} model, which {flags} cannot be used with")


def run(args: argparse.Namespace) -> int:
    # Checkpoints of other model kinds are dispatched here, before the detection path below.
    from vision.inference.semantic_predict import is_semantic, run_semantic_predict

    if is_semantic(args.weights[0], args.config, args.overrides):
        refuse_inapplicable(args, "semantic segmentation")
        return run_semantic_predict(args)
    from vision.inference.cls_predict import is_classifier_checkpoint, run_classifier_predict

    if is_classifier_checkpoint(args.weights[0]):
        refuse_inapplicable(args, "classifier")
        return run_classifier_predict(args)
    return _run_detection(args)


def _run_detection(args: argparse.Namespace) -> int:
    from vision.inference.draw import draw_prediction, save_drawing
    from vision.inference.ensemble import FusionSpec, build_predictor
    from vision.inference.predictor import hierarchy_expander, predict_paths
    from vision.runtime.device import select_device
    from vision.runtime.distributed import cleanup, dist_info, init_distributed

    paths = list_images(args.source)
    if not paths:
        raise VisionError(f"{args.source}: no images found")
    spec = FusionSpec(args.fusion, args.iou, args.skip_score)
    init_distributed(select_device(args.device))
    try:
        predictor = build_predictor(
            args.weights, config=args.config, overrides=args.overrides, device=args.device, amp=args.amp,
            tta=args.tta, tta_scales=args.tta_scales, spec=spec, model_weights=args.model_weights,
            engine=engine_options(args),
        )
        categories = predictor.categories
        expand, out_categories = None, None
        if args.hierarchy:
            from vision.ensemble import load_hierarchy

            merge = None if args.hierarchy_merge == "none" else args.hierarchy_merge
            expand, out_categories = hierarchy_expander(load_hierarchy(args.hierarchy), categories, merge)
        out = Path(args.out)
        root = Path(args.source) if Path(args.source).is_dir() else None

        def save(path, image, prediction):
            rel = Path(path).resolve().relative_to(root.resolve()) if root else Path(Path(path).name)
            save_drawing(draw_prediction(image, prediction, categories, args.draw_thresh), out / "images" / rel)

        summary = predict_paths(
            predictor, paths, out, root=root, batch_size=args.batch_size, num_workers=args.workers,
            on_image=save if args.save_images else None, expand=expand, categories=out_categories,
            write_csv=args.csv,
        )
        if dist_info().is_main:
            for line in summary.skipped:
                print(f"skipped {line}")
            written = ", ".join(str(out / n) for n in ["predictions.json", "images.json"] + (["predictions.csv"] * args.csv))
            print(
                f"predicted {summary.done} images ({summary.resumed} already done, {len(summary.skipped)} unreadable"
                f" skipped) with {len(args.weights)} model(s){' + TTA' if args.tta else ''},"
                f" {summary.detections} detections -> {written}"
            )
    finally:
        cleanup()
    return 0
