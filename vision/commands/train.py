"""``vision train CONFIG [key=value ...] [--resume [PATH]] [--output DIR]``.

Writes the run folder (``output_dir/name`` unless ``--output``): ``config.yaml`` (resolved),
``last.pt``, ``best.pt``, ``metrics.jsonl``, TensorBoard events under ``tb/`` and ``curves.png``.
Under ``torchrun`` every process runs this same command; rank 0 alone writes and prints.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.02")
    parser.add_argument(
        "--resume", nargs="?", const="auto", default=None, metavar="PATH",
        help="continue a run: its last.pt (default), a run folder or a checkpoint file",
    )
    parser.add_argument("--output", metavar="DIR", help="run folder (default: <output_dir>/<name>)")


def _split_resume(args: argparse.Namespace) -> None:
    """``--resume train.lr=0.1``: argparse hands the override to --resume; give it back."""
    if args.resume not in (None, "auto") and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)
        args.resume = "auto"


def run(args: argparse.Namespace) -> int:
    from vision.config import load_config
    from vision.errors import ConfigError
    from vision.runtime import distributed as du
    from vision.tasks.training import run_dir_of, train

    _split_resume(args)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.output) if args.output else run_dir_of(cfg)
    if args.resume is None and (run_dir / "last.pt").exists():
        raise ConfigError(
            f"{run_dir} already holds a run (last.pt): continue it with --resume, or choose another "
            "name= or --output"
        )
    try:
        summary = train(cfg, run_dir, resume=args.resume)
    finally:
        du.cleanup()
    if int(os.environ.get("RANK", "0")) == 0:
        best = summary["best_score"]
        best_text = f" (best {best:.4f} at iteration {summary['best_iteration']})" if best is not None else ""
        skipped = summary.get("skipped_images", [])
        skipped_text = f"; {len(skipped)} unreadable images skipped" if skipped else ""
        if summary.get("curves"):  # before the summary, which stays the last line
            print(f"curves -> {summary['curves']}")
        print(
            f"trained {summary['iterations']} iterations ({summary['epochs']:.2f} epochs) in "
            f"{summary['seconds']:.0f} s; {summary['score_name']} {summary['score']:.4f}{best_text}{skipped_text} -> {run_dir}"
        )
    return 0
