"""Export trained models to TorchScript or ONNX, and check the exported file against PyTorch.

Detectors are exported whole, pre- and post-processing included, with batch norms folded:

- TorchScript (``torch.jit.script``): input a list of float CHW images in [0, 1], any number and any
  size; output, as torchvision's scripted detectors give it, ``(losses, detections)`` where
  ``detections`` is one dict (boxes, labels, scores[, masks]) per image.
- ONNX (TorchScript-based exporter, opset 17): input ``image`` [3, H, W] float in [0, 1], one image per
  call, any height and width; outputs ``boxes`` [N, 4], ``labels`` [N], ``scores`` [N] (and ``masks``
  [N, 1, H, W] for Mask R-CNN), N varying per image.

Classifiers take a [B, 3, S, S] float batch in [0, 1] (S: the model's ``image_size``; any batch size,
and in ONNX any size) and return class probabilities [B, K].

Labels are the model's 1..K; the ``.json`` written beside the model maps them to the data set's
category ids and names.  After writing, the file is loaded back and run (ONNX with onnxruntime when it is
installed) on an example image, and the largest difference from the PyTorch model is reported.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vision.errors import VisionError
from vision.inference.engine import EngineOptions, optimize_for_inference
from vision.models.detection import detection_arch, drop_float32_hooks

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17


@dataclass
class ExportResult:
    path: Path
    format: str
    arch: str
    max_diff: float | None  # largest output difference from PyTorch on the example; None: not checked
    checked_with: str | None
    compared: int  # detections (or probabilities) compared


class ClassifierForExport(nn.Module):
    """A classifier as a plain tensor function: [B, 3, S, S] in [0, 1] -> class probabilities [B, K]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.multi_label = bool(getattr(model, "multi_label", False))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model.logits(self.model.batch(images))
        return logits.sigmoid() if self.multi_label else logits.softmax(-1)


def _example_image(height: int, width: int) -> torch.Tensor:
    """Smooth structure rather than noise, so that a detector finds something to compare."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(1, 3, max(2, height // 16), max(2, width // 16), generator=g)
    return torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)[0]


def detection_output_names(arch: str) -> list[str]:
    """The order torchvision's detectors fill their output dicts in, which the ONNX outputs follow."""
    if arch == "retinanet":
        return ["boxes", "scores", "labels"]
    return ["boxes", "labels", "scores"] + (["masks"] if arch == "mask_rcnn" else [])


def _matched_gap(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], top: int = 50) -> tuple[float, int]:
    """Largest score/box difference over ``ref``'s top detections, each matched by label and box in ``got``.

    Matching (rather than comparing position by position) keeps near-tied scores that swap places
    from counting as differences; detections tied with the last one kept may be cut differently by
    either runtime and are not compared.
    """
    if not len(ref["scores"]):
        return (0.0 if not len(got["scores"]) else float("inf")), 0
    cutoff = float(ref["scores"].min()) + 1e-3
    scale = max(1.0, float(ref["boxes"].abs().max()))
    worst, compared = 0.0, 0
    for k in range(min(top, len(ref["scores"]))):
        if float(ref["scores"][k]) <= cutoff:
            continue
        compared += 1
        box_gap = (got["boxes"] - ref["boxes"][k]).abs().amax(dim=1) / scale
        candidates = (got["labels"] == ref["labels"][k]) & (box_gap <= 1e-2)
        if not bool(candidates.any()):
            return float("inf"), compared
        score_gap = torch.maximum((got["scores"] - ref["scores"][k]).abs(), box_gap)
        worst = max(worst, float(score_gap[candidates].min()))
    return worst, compared


def _onnxruntime_session(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _export_detector(model: nn.Module, arch: str, fmt: str, out: Path, example: torch.Tensor) -> tuple[float | None, str | None, int]:
    with torch.no_grad():
        reference = model([example])[0]
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice; scripting still works
            scripted = torch.jit.script(model)
            scripted.save(str(out))
            loaded = torch.jit.load(str(out))
            with torch.no_grad():
                _, detections = loaded([example])
        gap, n = _matched_gap(detections[0], reference)
        return gap, "torch.jit.load", n
    names = detection_output_names(arch)
    dynamic = {"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in names}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values in torchvision's code
        torch.onnx.export(model, ([example],), str(out), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=names, dynamic_axes=dynamic)
    session = _onnxruntime_session(out)
    if session is None:
        return None, None, 0
    outputs = dict(zip(names, session.run(None, {"image": example.numpy()})))
    gap, n = _matched_gap({k: torch.from_numpy(v) for k, v in outputs.items()}, reference)
    return gap, "onnxruntime", n


def _export_classifier(model: nn.Module, fmt: str, out: Path, example: torch.Tensor) -> tuple[float | None, str | None, int]:
    wrapper = ClassifierForExport(model).eval()
    batch = torch.stack([example, example.flip(-1)])
    with torch.no_grad():
        reference = wrapper(batch)
    if fmt == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(wrapper, batch)
            traced.save(str(out))
            got = torch.jit.load(str(out))(torch.cat([batch, batch]))[:2]
        return float((got - reference).abs().max()), "torch.jit.load", reference.numel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (batch,), str(out), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["images"], output_names=["probs"],
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "probs": {0: "batch"}})
    session = _onnxruntime_session(out)
    if session is None:
        return None, None, 0
    got = torch.from_numpy(session.run(None, {"images": torch.cat([batch, batch]).numpy()})[0])[:2]
    return float((got - reference).abs().max()), "onnxruntime", reference.numel()


def export_model(
    weights: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike | None = None,
    *,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> ExportResult:
    """Writes ``weights`` as ``fmt`` (default path: beside the weights) plus a ``.json`` of its classes."""
    from vision.inference.loading import load_model_for_inference

    if fmt not in FORMATS:
        raise VisionError(f"export format '{fmt}': expected one of {', '.join(FORMATS)}")
    model, cfg, categories = load_model_for_inference(weights, config, overrides)
    suffix = ".onnx" if fmt == "onnx" else ".torchscript.pt"
    path = Path(out) if out is not None else Path(weights).with_suffix(suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    # folded batch norms: the exported graph is smaller and faster, and computes the same function
    # torchvision's own post-processing and convolutions: the batched post-processing and the Winograd
    # convolutions are Python-bound, not scriptable, and the runtimes have their own convolution kernels
    # (and fuse activations themselves)
    model = optimize_for_inference(
        model, EngineOptions(channels_last=False, batched_postprocess=False, winograd=False,
                             fuse_activations=False), copy_model=False
    )
    detector = detection_arch(model)
    arch = detector or cfg.model.arch
    if detector is not None:
        drop_float32_hooks(model)
        size = int(cfg.model.min_size[0]) if cfg.model.min_size else 512
        example = _example_image(size, int(size * 4 / 3))
        max_diff, checker, compared = _export_detector(model, arch, fmt, path, example)
        io: dict[str, Any] = {"input": "image: float [3, H, W] in [0, 1]" if fmt == "onnx"
                              else "list of float [3, H, W] images in [0, 1]",
                              "outputs": detection_output_names(arch)}
    elif arch == "classifier":
        size = int(getattr(model, "image_size", 224))
        max_diff, checker, compared = _export_classifier(model, fmt, path, _example_image(size, size))
        io = {"input": f"images: float [B, 3, {size}, {size}] in [0, 1]", "outputs": ["probs [B, K]"]}
    else:
        raise VisionError(f"{weights}: export covers detectors and classifiers, not '{arch}' models")
    meta = {"format": fmt, "arch": arch, "source": str(weights), **io,
            "labels": {str(i + 1 if arch != "classifier" else i): {"id": cid, "name": name}
                       for i, (cid, name) in enumerate(zip(categories.ids, categories.names))}}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return ExportResult(path, fmt, arch, max_diff, checker, compared)
