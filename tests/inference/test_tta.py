"""TTA: flipped and rescaled views map back onto the original image (known answers from a toy detector)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from vision.data.records import Categories
from vision.inference.ensemble import FusionSpec, fuse_predictions
from vision.inference.predictor import Predictor
from vision.inference.tta import TTAPredictor, flip_prediction, rescale_prediction, scaled_model


class BrightBoxDetector(nn.Module):
    """Finds the box around the bright pixels (exclusive far corner), with their mask: a known answer."""

    def forward(self, images):
        out = []
        for img in images:
            on = img[0] > 0.5
            ys, xs = torch.nonzero(on, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            out.append({
                "boxes": box,
                "scores": torch.tensor([0.9]),
                "labels": torch.tensor([1]),
                "masks": on.float()[None, None],
            })
        return out


def _image(h: int, w: int, x1: int, y1: int, x2: int, y2: int) -> torch.Tensor:
    img = torch.zeros((3, h, w), dtype=torch.uint8)
    img[:, y1:y2, x1:x2] = 255
    return img


def _tta(flip: bool, scales) -> TTAPredictor:
    predictor = Predictor(BrightBoxDetector(), Categories.from_names(["thing"]), device="cpu")
    return TTAPredictor(predictor, lambda preds, size: fuse_predictions(preds, size, FusionSpec("wbf")),
                        flip=flip, scales=scales)


def test_flip_view_of_symmetric_image_equals_plain_view() -> None:
    img = _image(40, 100, 30, 10, 70, 25)  # symmetric about the vertical centre line
    plain, flipped = _tta(True, (1.0,)).views([img])
    torch.testing.assert_close(flipped[0]["boxes"], plain[0]["boxes"])
    torch.testing.assert_close(flipped[0]["masks"], plain[0]["masks"])
    torch.testing.assert_close(plain[0]["boxes"], torch.tensor([[30.0, 10.0, 70.0, 25.0]]))


def test_flip_view_is_unflipped_to_the_original_position() -> None:
    img = _image(40, 100, 10, 5, 30, 20)  # off-centre: the flipped input has it at x 70..90
    views = _tta(True, (1.0,)).views([img])
    for v in views:
        torch.testing.assert_close(v[0]["boxes"], torch.tensor([[10.0, 5.0, 30.0, 20.0]]))
        assert v[0]["masks"][0, 0, 5:20, 10:30].all() and v[0]["masks"].sum() == 15 * 20


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_rescaled_views_map_back(scale: float) -> None:
    img = _image(40, 80, 20, 8, 60, 32)  # even corners, so half and double size are exact
    views = _tta(False, (scale,)).views([img])
    torch.testing.assert_close(views[0][0]["boxes"], torch.tensor([[20.0, 8.0, 60.0, 32.0]]), atol=1.0, rtol=0)
    assert views[0][0]["masks"].shape[-2:] == (40, 80)


def test_merged_views_give_the_common_box() -> None:
    img = _image(40, 80, 20, 8, 60, 32)
    [pred] = _tta(True, (1.0, 2.0)).predict([img])
    torch.testing.assert_close(pred["boxes"], torch.tensor([[20.0, 8.0, 60.0, 32.0]]), atol=1e-4, rtol=0)
    assert pred["labels"].tolist() == [1]
    assert pred["masks"].shape == (1, 1, 40, 80)


def test_flip_and_rescale_arithmetic() -> None:
    pred = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 6.0]]), "scores": torch.tensor([0.5]), "labels": torch.tensor([1])}
    torch.testing.assert_close(flip_prediction(pred, 10)["boxes"], torch.tensor([[6.0, 2.0, 9.0, 6.0]]))
    torch.testing.assert_close(rescale_prediction(pred, (20, 10), (40, 5))["boxes"], torch.tensor([[0.5, 4.0, 2.0, 12.0]]))


def test_torchvision_detector_scaled_through_its_transform() -> None:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    model = nn.Module()
    model.transform = GeneralizedRCNNTransform(100, 200, [0.5] * 3, [0.2] * 3)
    with scaled_model(model, 1.5) as resize_input:
        assert not resize_input
        assert model.transform.min_size == (150,) and model.transform.max_size == 300
    assert model.transform.min_size == (100,) and model.transform.max_size == 200
    with scaled_model(nn.Identity(), 1.5) as resize_input:
        assert resize_input
