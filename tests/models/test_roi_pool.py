"""The threaded multi-scale RoIAlign against torchvision's ``MultiScaleRoIAlign`` (the reference)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from vision.models import roi_pool
from vision.models.roi_pool import ThreadedMultiScaleRoIAlign

IMAGE = (96, 128)


def pyramid(num_images: int, channels: int = 8, levels: int = 4) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        (str(k), torch.randn(num_images, channels, IMAGE[0] >> (k + 2), IMAGE[1] >> (k + 2), generator=g))
        for k in range(levels)
    )


def proposals(num_images: int, per_image: int) -> list[torch.Tensor]:
    """Boxes of every size (so every level gets some), some past the image border, one image without any."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(num_images):
        n = 0 if i == 1 else per_image
        xy = torch.rand(n, 2, generator=g) * torch.tensor([IMAGE[1], IMAGE[0]]) - 8
        wh = torch.exp(torch.rand(n, 2, generator=g) * 5) + 1  # 2 .. 150 px
        out.append(torch.cat([xy, xy + wh], 1))
    return out


@pytest.mark.parametrize("num_images", [2, 3])
@pytest.mark.parametrize("output_size", [7, 14])
def test_outputs_and_gradients_are_torchvisions(num_images, output_size):
    names = ["0", "1", "2", "3"]
    # a canonical scale of 16 px spreads these 2-150 px boxes over all four levels
    ours = ThreadedMultiScaleRoIAlign(names, output_size=output_size, sampling_ratio=2, canonical_scale=16)
    ref = MultiScaleRoIAlign(names, output_size=output_size, sampling_ratio=2, canonical_scale=16)
    boxes = proposals(num_images, 40)
    shapes = [IMAGE] * num_images
    results = []
    for module in (ref, ours):
        feats = OrderedDict((k, v.clone().requires_grad_()) for k, v in pyramid(num_images).items())
        out = module(feats, boxes, shapes)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), [f.grad for f in feats.values()]))
    (ref_out, ref_grads), (out, grads) = results
    assert out.shape == (sum(len(b) for b in boxes), 8, output_size, output_size)
    assert torch.equal(out, ref_out)
    for g, rg in zip(grads, ref_grads):
        assert rg.abs().sum() > 0 and torch.equal(g, rg)


def test_the_threaded_path_is_the_one_taken_for_a_cpu_batch(monkeypatch):
    calls = []
    real = roi_pool._PerImageRoIAlign.apply
    monkeypatch.setattr(roi_pool._PerImageRoIAlign, "apply", lambda *a: calls.append(1) or real(*a))
    module = ThreadedMultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    module(pyramid(2), proposals(2, 10), [IMAGE] * 2)
    assert calls == [1]
    module(pyramid(1), proposals(1, 10), [IMAGE])  # one image: nothing to spread, torchvision's own call
    assert calls == [1]


def test_scripts_with_torchvisions_path():
    module = torch.jit.script(ThreadedMultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2))
    ref = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    feats, boxes = pyramid(2), proposals(2, 10)
    assert torch.equal(module(feats, boxes, [IMAGE] * 2), ref(feats, boxes, [IMAGE] * 2))
