"""``vision <command>``: the command line.

Each command lives in its own module under ``vision.commands`` with two functions,
``add_arguments(parser)`` and ``run(args) -> int``; this file only maps names to modules (a dict, not
a registry) and turns a ``VisionError`` (bad input), or an operating-system error about a file the user
named (missing, read-only, a file where a folder should be), into one line on stderr and exit code 2.
Any other exception keeps its traceback: it is a bug.
Modules are imported on use, so ``vision --help`` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from vision.errors import VisionError

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("vision.commands.train", "train a model from a YAML config"),
    "eval": ("vision.commands.evaluate", "evaluate a checkpoint on the config's validation set"),
    "predict": ("vision.commands.predict", "run inference over a folder, glob or list of images"),
    "eval-dets": ("vision.commands.eval_dets", "COCO evaluation of a results file against ground truth"),
    "convert": ("vision.commands.convert", "convert VOC / YOLO / COCO annotations to COCO JSON"),
    "synthetic": ("vision.commands.synthetic", "write the procedural synthetic data set"),
    "fuse": ("vision.commands.fuse", "fuse several COCO results files (NMS, soft-NMS, WBF, score-sum)"),
    "expand": ("vision.commands.expand", "add parent-class copies of detections from a class hierarchy"),
    "show-augment": ("vision.commands.show_augment", "draw augmented training samples"),
    "export": ("vision.commands.export", "export a model to ONNX or TorchScript"),
    "demo": ("vision.commands.demo", "make synthetic data, train, evaluate and predict, end to end"),
    "inspect": ("vision.commands.inspect", "report a recipe's data set (sizes, boxes vs anchors, classes) before training"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {
        name: spec for name, spec in COMMANDS.items() if importlib.util.find_spec(spec[0]) is not None
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vision", description="Detection, segmentation and classification on timm backbones."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Parse the command name first, then let the command's module add its own arguments.
    first, _ = parser.parse_known_args(argv[:1]) if argv and not argv[0].startswith("-") else (None, None)
    if first is None:
        parser.parse_args(argv)
        return 2
    module = importlib.import_module(first._module)
    sub = argparse.ArgumentParser(prog=f"vision {first.command}", description=COMMANDS[first.command][1])
    module.add_arguments(sub)
    args = sub.parse_intermixed_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except VisionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the user named: missing, read-only, a file where a folder goes
        if e.filename is None or e.errno is None:
            raise
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
