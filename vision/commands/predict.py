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
    parser.add_argument("--save-images", action="store_true", help="also write each image with its detections drawn")
    parser.add_argument("--draw-thresh", type=float, default=0.3, help="score needed to be drawn")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="decoding worker processes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="float16 (CUDA) / bfloat16 (CPU) inference")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. model.score_thresh=0.3")


def run(args: argparse.Namespace) -> int:
    from vision.engine.semantic_predict import is_semantic, run_semantic_predict

    if is_semantic(args.weights[0], args.config, args.overrides):
        return run_semantic_predict(args)

    from vision.engine.draw import draw_prediction, save_drawing
    from vision.engine.predictor import Predictor, load_model_for_inference, predict_paths

    if len(args.weights) > 1:
        raise VisionError("several --weights: ensembling is done with --fusion, which this build does not have yet")
    paths = list_images(args.source)
    if not paths:
        raise VisionError(f"{args.source}: no images found")
    model, _, categories = load_model_for_inference(args.weights[0], args.config, args.overrides)
    predictor = Predictor(model, categories, device=args.device, amp=args.amp)
    out = Path(args.out)
    root = Path(args.source) if Path(args.source).is_dir() else None

    def save(path, image, prediction):
        rel = Path(path).resolve().relative_to(root.resolve()) if root else Path(Path(path).name)
        save_drawing(draw_prediction(image, prediction, categories, args.draw_thresh), out / "images" / rel)

    summary = predict_paths(
        predictor, paths, out, root=root, batch_size=args.batch_size, num_workers=args.workers,
        on_image=save if args.save_images else None,
    )
    for line in summary.skipped:
        print(f"skipped {line}")
    print(
        f"predicted {summary.done} images ({summary.resumed} already done, {len(summary.skipped)} unreadable skipped),"
        f" {summary.detections} detections -> {out / 'predictions.json'}, {out / 'images.json'}"
    )
    return 0
