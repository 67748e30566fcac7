"""``paste_masks`` (the engine's Mask R-CNN paste) gives torchvision's ``paste_masks_in_image`` bit for bit.

torchvision is the reference: every case below pastes the same mask probabilities into the same image
with both and asserts equal probability maps and equal binary masks.  torchvision's paste pads the
28x28 mask by one pixel, widens the box by 30/28 about its centre, truncates the corners to integers
(toward zero) and resizes the padded mask to ``max(int(x1) - int(x0) + 1, 1)`` columns and as many rows
likewise; the small boxes are where a different rounding anywhere in that chain shows.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import expand_boxes, paste_masks_in_image

from vision.inference.postprocess import paste_masks

H, W = 90, 120


def _probs(n: int, seed: int) -> torch.Tensor:
    """Mask probabilities as ``maskrcnn_inference`` gives them: sigmoids of logits, many near 0.5."""
    g = torch.Generator().manual_seed(seed)
    return torch.sigmoid(torch.randn(n, 1, 28, 28, generator=g) * 2)


def _boxes(n: int, seed: int, size_lo: float, size_hi: float, lo: float = 0.0, hi_x: float = W,
           hi_y: float = H) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, generator=g) * (hi_x - lo) + lo
    y0 = torch.rand(n, generator=g) * (hi_y - lo) + lo
    wh = torch.rand(n, 2, generator=g) * (size_hi - size_lo) + size_lo
    return torch.stack([x0, y0, x0 + wh[:, 0], y0 + wh[:, 1]], dim=1)


def _clip(boxes: torch.Tensor) -> torch.Tensor:
    """As the box head gives them: clipped to the image."""
    out = boxes.clone()
    out[:, 0::2] = out[:, 0::2].clamp(0, W)
    out[:, 1::2] = out[:, 1::2].clamp(0, H)
    return out


def _assert_same_paste(boxes: torch.Tensor, seed: int = 0) -> torch.Tensor:
    masks = _probs(len(boxes), seed)
    ref = paste_masks_in_image(masks, boxes, (H, W))
    got = paste_masks(masks, boxes, (H, W))
    assert got.shape == ref.shape == (len(boxes), 1, H, W)
    assert got.dtype == ref.dtype
    assert torch.equal(got, ref), f"largest difference {(got - ref).abs().max().item()}"
    assert torch.equal(got > 0.5, ref > 0.5)
    return ref


def _pasted_sizes(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The widths and heights torchvision resizes each padded mask to."""
    ib = expand_boxes(boxes, 30 / 28).to(torch.int64)
    return (ib[:, 2] - ib[:, 0] + 1).clamp(min=1), (ib[:, 3] - ib[:, 1] + 1).clamp(min=1)


def test_sub_pixel_boxes() -> None:
    """Boxes under a pixel wide or tall (the 0.65 px kind): one or two columns, depending on where the
    expanded box's corners fall between integers."""
    boxes = _boxes(300, 1, 0.05, 0.95)
    tall = boxes.clone()
    tall[:, 3] = tall[:, 1] + 40.0  # a 0.65 x 40 px sliver, as thin objects give
    boxes = _clip(torch.cat([boxes, tall]))
    widths, _ = _pasted_sizes(boxes)
    assert set(widths.tolist()) == {1, 2}, "both roundings of a sub-pixel box are exercised"
    ref = _assert_same_paste(boxes, seed=1)
    assert (ref > 0.5).flatten(1).any(1).sum() > 100, "the masks are not all empty"


@pytest.mark.parametrize("size", [1.0, 2.0, 3.0])
def test_one_to_three_pixel_boxes(size: float) -> None:
    g = torch.Generator().manual_seed(int(size))
    boxes = _boxes(200, int(size), size - 0.5, size + 0.5)
    whole = torch.randint(0, 80, (50, 2), generator=g).float()  # integer corners, exactly size px apart
    boxes = _clip(torch.cat([boxes, torch.cat([whole, whole + size], dim=1)]))
    widths, heights = _pasted_sizes(boxes)
    assert len(set(widths.tolist())) >= 2 and len(set(heights.tolist())) >= 2
    _assert_same_paste(boxes, seed=int(size))


def test_boxes_touching_and_crossing_every_border() -> None:
    edge = []
    for side in range(4):
        b = _boxes(40, 10 + side, 0.3, 12.0)
        if side == 0:  # left: touching x = 0 or across it
            b[:, 2] -= b[:, 0] - torch.linspace(-6, 0, 40)
            b[:, 0] = torch.linspace(-6, 0, 40)
        elif side == 1:  # top
            b[:, 3] -= b[:, 1] - torch.linspace(-6, 0, 40)
            b[:, 1] = torch.linspace(-6, 0, 40)
        elif side == 2:  # right: up to W or beyond
            b[:, 0] += torch.linspace(W, W + 6, 40) - b[:, 2]
            b[:, 2] = torch.linspace(W, W + 6, 40)
        else:  # bottom
            b[:, 1] += torch.linspace(H, H + 6, 40) - b[:, 3]
            b[:, 3] = torch.linspace(H, H + 6, 40)
        edge.append(b)
    corners = torch.tensor([[-3.0, -3.0, 4.0, 4.0], [W - 4.0, -3.0, W + 3.0, 4.0],
                            [-3.0, H - 4.0, 4.0, H + 3.0], [W - 4.0, H - 4.0, W + 3.0, H + 3.0],
                            [W - 0.4, H - 0.4, W - 0.1, H - 0.1], [0.1, 0.1, 0.4, 0.4]])
    boxes = torch.cat([*edge, corners])
    # the engine's input (clipped, as the box head gives them) and unclipped boxes that cross a border
    inside = (boxes[:, 0] < W) & (boxes[:, 1] < H) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    _assert_same_paste(_clip(boxes), seed=3)
    _assert_same_paste(boxes[inside], seed=4)


def test_large_and_whole_image_boxes() -> None:
    boxes = _boxes(30, 5, 40.0, 200.0, lo=-60.0)
    boxes[0] = torch.tensor([-30.0, -20.0, W + 30.0, H + 20.0])
    boxes[1] = torch.tensor([0.0, 0.0, float(W), float(H)])
    inside = (boxes[:, 0] < W) & (boxes[:, 1] < H) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    _assert_same_paste(_clip(boxes), seed=5)
    _assert_same_paste(boxes[inside], seed=6)


def test_many_boxes_of_every_size() -> None:
    g = torch.Generator().manual_seed(7)
    sizes = torch.rand(600, generator=g) ** 3 * 60  # mostly small, as crowded nuclei
    boxes = _boxes(600, 7, 0.0, 1.0)
    boxes[:, 2:] = boxes[:, :2] + sizes[:, None] * (0.5 + torch.rand(600, 2, generator=g))
    boxes[:5] = torch.tensor([20.0, 20.0, 20.0, 20.0])  # zero area
    _assert_same_paste(_clip(boxes), seed=7)


def test_zero_detections() -> None:
    masks, boxes = _probs(0, 0), torch.zeros(0, 4)
    ref = paste_masks_in_image(masks, boxes, (H, W))
    got = paste_masks(masks, boxes, (H, W))
    assert got.shape == ref.shape == (0, 1, H, W)
    assert got.dtype == ref.dtype


def test_other_paddings_and_dtypes() -> None:
    """``padding`` and the masks' dtype are passed through as torchvision's are."""
    boxes = _clip(_boxes(60, 8, 0.2, 20.0))
    masks = _probs(60, 8)
    for padding in (0, 2):
        ref = paste_masks_in_image(masks, boxes, (H, W), padding=padding)
        assert torch.equal(paste_masks(masks, boxes, (H, W), padding=padding), ref)
    ref = paste_masks_in_image(masks.double(), boxes.double(), (H, W))
    got = paste_masks(masks.double(), boxes.double(), (H, W))
    assert got.dtype == torch.float64 and torch.equal(got, ref)
