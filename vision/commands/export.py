"""``vision export``: a checkpoint as TorchScript or ONNX, checked against PyTorch after writing."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="vision checkpoint, or a state_dict with --config")
    parser.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    parser.add_argument("--out", help="output file (default: beside the weights, .onnx / .torchscript.pt)")
    parser.add_argument("--config", help="config for a plain torchvision state_dict")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. model.score_thresh=0.3")


def run(args: argparse.Namespace) -> int:
    from vision.inference.export import export_model

    result = export_model(args.weights, args.format, args.out, config=args.config, overrides=args.overrides)
    check = (
        f"max difference from PyTorch {result.max_diff:.2e} over {result.compared} outputs ({result.checked_with})"
        if result.max_diff is not None
        else "not checked (onnxruntime is not installed)"
    )
    print(f"exported {result.arch} -> {result.path} ({result.format}); classes in "
          f"{result.path.with_suffix('.json')}; {check}")
    if result.max_diff is not None and result.max_diff > 1e-3:
        print(f"warning: the exported model differs from PyTorch by {result.max_diff:.2e} (more than 1e-3)")
        return 1
    return 0
