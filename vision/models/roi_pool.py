"""Multi-scale RoIAlign whose CPU kernels run on every core: torchvision's kernels, one task per image.

torchvision's CPU RoIAlign kernels, forward and backward, run on a single thread.  In a Faster R-CNN
training step on a 2-core CPU (the BCCD recipe) the backward alone took ~30% of the step while the
other core idled.  The features pooled for an image depend only on that image's feature map and RoIs,
so here every (pyramid level, image) pair is one task on a thread pool, run by the same torchvision
kernels (torch ops release the GIL), and the results are put back in place.  Each image's RoIs are
visited in the same order as in one batched call, so outputs and gradients are bitwise torchvision's.

``ThreadedMultiScaleRoIAlign`` is ``torchvision.ops.MultiScaleRoIAlign`` with this path for CPU
tensors of more than one image; on CUDA, for a single image, under TorchScript, tracing, export or
``torch.compile`` it runs torchvision's own code unchanged.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import (
    _convert_to_roi_format,
    _filter_input,
    _multiscale_roi_align,
    _setup_scales,
)

_EXECUTOR: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="roi_align")
    return _EXECUTOR


@dataclass
class _Task:
    """The RoIs of one image on one pyramid level: their rows in the output, and in roi format for a
    one-image call (batch index 0)."""

    level: int
    image: int
    rows: Tensor
    rois: Tensor


def _tasks(rois: Tensor, levels: Tensor, num_levels: int, num_images: int) -> list[_Task]:
    tasks = []
    image_of = rois[:, 0].long()
    for level in range(num_levels):
        on_level = levels == level
        for image in range(num_images):
            rows = torch.nonzero(on_level & (image_of == image)).flatten()
            if rows.numel():
                local = rois[rows].clone()
                local[:, 0] = 0
                tasks.append(_Task(level, image, rows, local))
    return tasks


class _PerImageRoIAlign(torch.autograd.Function):
    """RoIAlign over several pyramid levels at once; ``features`` are the levels, the RoIs already
    assigned to them (``levels``)."""

    @staticmethod
    def forward(ctx, rois, levels, scales, output_size, sampling_ratio, *features):
        num_images, channels = features[0].shape[:2]
        tasks = _tasks(rois, levels, len(features), num_images)
        ph, pw = output_size

        def pool(task: _Task) -> Tensor:
            feature = features[task.level][task.image : task.image + 1]
            with torch.no_grad():  # grad mode is per thread: a pool thread's starts on
                return torch.ops.torchvision.roi_align(
                    feature, task.rois, scales[task.level], ph, pw, sampling_ratio, False
                )

        result = features[0].new_zeros((rois.shape[0], channels, ph, pw))
        for task, pooled in zip(tasks, _executor().map(pool, tasks)):
            result[task.rows] = pooled
        ctx.tasks, ctx.scales, ctx.output_size, ctx.sampling_ratio = tasks, scales, output_size, sampling_ratio
        ctx.shapes = [f.shape for f in features]
        return result

    @staticmethod
    def backward(ctx, grad):
        ph, pw = ctx.output_size
        grads = [grad.new_zeros(shape) for shape in ctx.shapes]  # every level has the RoIs' dtype

        def unpool(task: _Task) -> Tensor:
            _, channels, height, width = ctx.shapes[task.level]
            with torch.no_grad():
                return torch.ops.torchvision._roi_align_backward(
                    grad[task.rows].contiguous(), task.rois, ctx.scales[task.level], ph, pw, 1, channels,
                    height, width, ctx.sampling_ratio, False,
                )

        for task, image_grad in zip(ctx.tasks, _executor().map(unpool, ctx.tasks)):
            grads[task.level][task.image] = image_grad[0]
        return (None, None, None, None, None, *grads)


def _threads_help(features: list[Tensor], boxes: list[Tensor]) -> bool:
    first = features[0]
    return (
        first.device.type == "cpu"
        and first.shape[0] > 1
        and torch.get_num_threads() > 1
        and all(f.dtype == boxes[0].dtype and f.dtype in (torch.float32, torch.float64) for f in features)
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and not torch.onnx.is_in_onnx_export()
    )


class ThreadedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` that pools a CPU batch's images on parallel threads (same results)."""

    def forward(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> Tensor:
        x_filtered = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                x_filtered, image_shapes, self.canonical_scale, self.canonical_level
            )
        if not torch.jit.is_scripting():  # noqa: SIM102 - alone, TorchScript skips the block
            if _threads_help(x_filtered, boxes):
                return self._threaded(x_filtered, boxes)
        return _multiscale_roi_align(
            x_filtered, boxes, self.output_size, self.sampling_ratio, self.scales, self.map_levels
        )

    @torch.jit.unused
    def _threaded(self, features: list[Tensor], boxes: list[Tensor]) -> Tensor:
        rois = _convert_to_roi_format(boxes)
        if len(features) == 1:
            levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
        else:
            levels = self.map_levels(boxes)
        return _PerImageRoIAlign.apply(
            rois, levels, tuple(self.scales), tuple(self.output_size), self.sampling_ratio, *features
        )
