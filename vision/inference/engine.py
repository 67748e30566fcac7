"""The inference engine: the same weights as training produced, computed faster.

What it changes, and why each step is safe:

- Batch norms are folded into the convolutions before them (``fold_bn.py``): the same function with
  one pass over every activation map fewer.
- Weights and activations are ``channels_last``: oneDNN's convolutions work in NHWC, so an NCHW
  model pays a layout reorder around every convolution; with NHWC throughout none is needed.
- On a CPU in float32, wide 3x3 convolutions (backbone, FPN, head towers, RPN) compute by Winograd's
  F(4x4, 3x3) (``winograd.py``, its transforms in C where the extension was built, and its batched
  product too on CPUs with AVX-512): oneDNN's direct kernel already runs near the machine's peak, so
  only less arithmetic makes them faster, and F(4x4, 3x3) needs a quarter of the multiplications.  Its
  rounding (about 1e-5 of a value, against 1e-6 directly) moves RetinaNet's and Faster R-CNN's scores
  by about 1e-6 and boxes by about 1e-4 px on 800 px photos.  ``winograd_tile=2`` takes F(2x2, 3x3)
  instead: four ninths of the multiplications, rounding below the direct kernel's.
- On a CPU, ReLUs and ResNet blocks' residual additions run inside the convolutions before them
  (``fused_conv.py``): oneDNN's post-ops, or in cache for Winograd convolutions, instead of two more
  passes over each activation map.
- Images are fed in micro-batches of similar aspect ratio.  On a CPU one full-size image already
  fills the cores, and a padded batch only adds memory traffic (and padding when the sizes differ), so
  images run one at a time there; on a GPU batches fill the device, and grouping by aspect ratio keeps
  the padding torchvision's transform adds small.
- Post-processing (RetinaNet's, and the R-CNN proposal filter and box head) runs once for the whole
  batch (``postprocess.py``) instead of per image: the same detections with a fraction of the small
  kernel calls.
- Freed host memory stays in the process (``host_memory.py``): glibc otherwise returns every large
  activation buffer to the kernel and faults it back in, zero-filled, on the next forward pass, a
  quarter of a million page faults per 800 px image.
- Optional reduced precision (bfloat16 on CPUs with native support, float16 or bfloat16 on CUDA) and
  optional compilation (``compile_model``: the backbone and the dense heads, ahead of time by
  AOTInductor with weight freezing on a CPU, one package for every image size, kept on disk).  These
  trade exactness or start-up time for speed and are off by default; the float32 path, compiled or
  not, stays within 1e-3 of the unoptimised model.

``torch.inference_mode`` and pinned, non-blocking host-to-device copies are applied by the predictor.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vision.inference.fold_bn import fold_batch_norms
from vision.inference.fused_conv import fuse_activations
from vision.inference.postprocess import use_batched_postprocess
from vision.inference.winograd import use_winograd
from vision.models.layout import use_channels_last
from vision.runtime.host_memory import retain_freed_memory

log = logging.getLogger(__name__)

@dataclass
class EngineOptions:
    """How the predictor runs a model.  ``EngineOptions.plain()`` is the model exactly as trained."""

    fold_bn: bool = True
    channels_last: bool = True
    precision: str = "fp32"
    compile: bool = False
    micro_batch: int = 0  # images per forward pass; 0: 1 on CPU, 8 on CUDA
    batched_postprocess: bool = True  # RetinaNet / R-CNN: one pass over the batch, not a loop per image
    retain_memory: bool = True  # keep freed host memory for reuse (glibc; process-wide, see host_memory.py)
    winograd: bool = True  # 3x3 convolutions by Winograd's algorithm (float32 on a CPU)
    winograd_tile: int = 4  # its output tiles: 4 (fewest products) or 2 (rounding below the direct kernel's)
    fuse_activations: bool = True  # ReLUs and residual additions inside the convolutions (oneDNN, CPU)

    @classmethod
    def plain(cls) -> EngineOptions:
        return cls(fold_bn=False, channels_last=False, precision="fp32", compile=False, micro_batch=0,
                   batched_postprocess=False, retain_memory=False, winograd=False,
                   fuse_activations=False)

    def images_per_pass(self, device: torch.device) -> int:
        if self.micro_batch > 0:
            return self.micro_batch
        return 8 if device.type == "cuda" else 1


def optimize_for_inference(model: nn.Module, options: EngineOptions, copy_model: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` (or the model itself) rewritten as ``options`` say.

    The rewritten model takes and returns what the original does.  Folding changes parameters, so the
    result is for inference only; ``copy_model`` keeps the caller's model trainable.
    """
    model = copy.deepcopy(model) if copy_model else model
    model.eval()
    if options.retain_memory:
        retain_freed_memory()
    if options.fold_bn:
        folded = fold_batch_norms(model)
        log.debug("folded %d batch norms", folded)
    if options.channels_last:
        use_channels_last(model)
    if options.batched_postprocess:
        use_batched_postprocess(model)
    if options.winograd and options.precision == "fp32" and _device(model).type == "cpu":
        rewritten = use_winograd(model, tile=options.winograd_tile)
        log.debug("%d convolutions by Winograd's F(%dx%d, 3x3)", rewritten, options.winograd_tile, options.winograd_tile)
    if options.fuse_activations and _device(model).type == "cpu":
        log.debug("%d ReLUs moved into convolutions", fuse_activations(model))
    if options.compile:
        model = compile_model(model)
    return model


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# The parts of a detector that take and return tensors (or lists / dicts of them) of a shape fixed by the
# image size: torch.compile traces them whole.  Box heads see a varying number of proposals and stay eager.
COMPILED_PARTS = ("backbone", "head", "rpn.head")


def compile_model(model: nn.Module) -> nn.Module:
    """Compile the tensor-shaped parts of a detector ahead of time (``aot.CompiledPart``; the model itself
    when it has none): exported once for every image size, compiled by AOTInductor, and kept on disk, so
    that a later process loads the packages instead of tracing again.

    On a CPU, inductor's freezing is switched on (process-wide): the weights become constants, so
    oneDNN's convolutions get their weights pre-packed once instead of reordered every call, and
    convolutions fuse with the additions and activations after them.  Winograd convolutions enter the
    programs as one operator each (``vision::winograd_conv3x3``).
    """
    from vision.inference.aot import CompiledPart

    if _device(model).type == "cpu":
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
    multiple = int(getattr(getattr(model, "transform", None), "size_divisible", 1) or 1)
    compiled = 0
    for path in COMPILED_PARTS:
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            continue
        part = getattr(parent, name, None)
        if isinstance(part, nn.Module):
            setattr(parent, name, CompiledPart(part, image_multiple=multiple if name == "backbone" else 1))
            compiled += 1
    return model if compiled else torch.compile(model, dynamic=True)


def aspect_groups(images: Sequence[torch.Tensor], size: int) -> list[list[int]]:
    """Indices of ``images`` in groups of at most ``size``, images of similar aspect ratio together."""
    order = sorted(range(len(images)), key=lambda i: images[i].shape[-1] / max(images[i].shape[-2], 1))
    return [order[k : k + size] for k in range(0, len(order), size)]
