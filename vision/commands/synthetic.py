"""``vision synthetic``: write the procedural shapes data set (COCO JSON + images)."""

from __future__ import annotations

import argparse

from vision.data.synthetic import DEFAULT_CLASSES, SHAPES, make_synthetic_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (train.json, val.json, images/)")
    parser.add_argument("--num-train", type=int, default=200, help="training images (default 200)")
    parser.add_argument("--num-val", type=int, default=50, help="validation images (default 50)")
    parser.add_argument("--size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"),
                        help="image width and height (default 320 240)")
    parser.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                        help=f"a count, or comma-separated shape names from: {', '.join(SHAPES)}")
    parser.add_argument("--max-objects", type=int, default=6, help="most shapes per image (default 6)")
    parser.add_argument("--object-size", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="shape diameters in pixels (default 16 to 45%% of the shorter side)")
    parser.add_argument("--long-tail", type=float, default=None, metavar="R",
                        help="first class R times as frequent as the last, geometric in between")
    parser.add_argument("--one-class-per-image", action="store_true",
                        help="all shapes of an image share one class (frequencies then count images)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--semantic", action="store_true",
                        help="also write class-index PNG masks to semantic/ (0 background)")
    parser.add_argument("--contiguous-ids", action="store_true",
                        help="category ids 1..K instead of 1, 3, 5, ...")
    parser.add_argument("--polygon-fraction", type=float, default=0.5,
                        help="share of unoccluded hole-free shapes written as polygons, not RLE")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="image format")


def run(args: argparse.Namespace) -> int:
    classes = int(args.classes) if args.classes.isdigit() else [c.strip() for c in args.classes.split(",")]
    summary = make_synthetic_dataset(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=tuple(args.size),
        classes=classes,
        max_objects=args.max_objects,
        min_object_size=args.object_size[0] if args.object_size else None,
        max_object_size=args.object_size[1] if args.object_size else None,
        long_tail=args.long_tail,
        one_class_per_image=args.one_class_per_image,
        seed=args.seed,
        semantic=args.semantic,
        contiguous_ids=args.contiguous_ids,
        polygon_fraction=args.polygon_fraction,
        image_format=args.format,
    )
    counts = {name: summary["counts"]["train"][name] + summary["counts"]["val"][name]
              for name in summary["counts"]["train"]}
    n_img, n_ann = summary["num_images"], summary["num_annotations"]
    print(f"wrote {n_img['train']} train + {n_img['val']} val images, "
          f"{n_ann['train']} + {n_ann['val']} objects "
          f"({', '.join(f'{k} {v}' for k, v in counts.items())}) to {summary['out_dir']}")
    return 0
