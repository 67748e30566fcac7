"""The operations of detection AutoAugment, with boxes and instance masks moved alongside the pixels.

The operations and their arguments follow the published detection policies (Zoph et al. 2019, as
released in TensorFlow's object detection ``autoaugment_utils.py``): colour operations with the
semantics of PIL (which that release reproduces), geometric operations as affine warps with
nearest-neighbour sampling and grey (128) fill, and ``*_Only_BBoxes`` operations that apply an
operation to the content of each box alone.

Where the release is ambiguous or worse, this module chooses, and says so here:

- Every geometric warp moves instance masks with the same matrix (nearest neighbour, so a mask pixel
  follows its image pixel exactly); boxes then become the tight box of each transformed mask.  Without
  masks a box becomes the box around its transformed corners, clipped to the image.  Instances left
  with an empty mask or a box under one pixel wide or high are dropped (the release clips them to a
  degenerate box and keeps them, which a torchvision detector would reject).
- Contrast blends towards the mean grey level, as PIL does; the release divides the pixel count by 256
  instead of computing a mean, which makes the target depend on the image size.
- Posterize to 0 bits keeps 1 bit: the release's bit shift saturates at 7, so level 2 (0 bits) leaves
  each channel at 0 or 128 rather than black.
- Cutout and BBox_Cutout occlude pixels but leave boxes and masks alone (an occluded object is still
  there), as the release does.
- An ``*_Only_BBoxes`` operation works on the pixels a box covers (floor of its left/top edge to ceil
  of its right/bottom edge), and moves the masks inside that region with it; without masks the boxes
  stay as they were, as in the release.

The pixel constants of the release (translations of up to 250 pixels, cutouts of up to 100) were set
for COCO images of about 640 pixels; ``AutoAugmentHparams.reference_size`` rescales them to the image
at hand when set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from vision.data.autoaugment_primitives import (
    Sample,
    apply_in_boxes,
    autocontrast,
    bbox_cutout,
    brightness,
    color,
    contrast,
    cutout,
    equalize,
    flip_matrix,
    posterize,
    rotate_matrix,
    sharpness,
    shear_matrix,
    solarize,
    solarize_add,
    translate_matrix,
    warp_sample,
)

MAX_LEVEL = 10.0
BBOX_ONLY_PROB_SCALE = 1.0 / 3.0  # per-box probability of *_Only_BBoxes ops = policy probability / 3



@dataclass(frozen=True)
class AutoAugmentHparams:
    """Magnitude constants of the published policies (pixels at a ~640 px image)."""

    translate_const: float = 250.0
    translate_bbox_const: float = 120.0
    cutout_const: float = 100.0
    cutout_bbox_const: float = 50.0
    cutout_max_pad_fraction: float = 0.75
    reference_size: int | None = None  # when set, pixel constants scale by min(H, W) / reference_size

    def pixels(self, const: float, level: float, shape: tuple[int, ...]) -> float:
        value = level / MAX_LEVEL * const
        if self.reference_size:
            value *= min(shape[0], shape[1]) / self.reference_size
        return value


# --------------------------------------------------------------------------------------------------
# the named operations: (sample, level 0-10, probability, rng, hparams) -> sample


OpFn = Callable[[Sample, float, float, np.random.Generator, AutoAugmentHparams], Sample]


@dataclass(frozen=True)
class Operation:
    """A named operation.

    ``in_boxes``: it draws per box, with the policy probability / 3, instead of once per image (the
    policy then always calls it).  ``geometric``: it moves pixels, so boxes and masks move too.
    """

    name: str
    fn: OpFn
    in_boxes: bool = False
    geometric: bool = False


OPERATIONS: dict[str, Operation] = {}


def _register(name: str, *, in_boxes: bool = False, geometric: bool = False) -> Callable[[OpFn], OpFn]:
    def deco(fn: OpFn) -> OpFn:
        OPERATIONS[name] = Operation(name, fn, in_boxes, geometric)
        return fn

    return deco


def _signed(value: float, rng: np.random.Generator) -> float:
    """The release negates rotation, shear and translation magnitudes half of the time."""
    return -value if rng.random() < 0.5 else value


def _with_image(sample: Sample, image: np.ndarray) -> Sample:
    out = dict(sample)
    out["image"] = np.ascontiguousarray(image)
    return out


def _hw(sample: Sample) -> tuple[int, int]:
    return sample["image"].shape[0], sample["image"].shape[1]


def _enhance_factor(level: float) -> float:
    return level / MAX_LEVEL * 1.8 + 0.1


def _degrees(level: float, rng: np.random.Generator) -> float:
    return _signed(level / MAX_LEVEL * 30.0, rng)


def _shear(level: float, rng: np.random.Generator) -> float:
    return _signed(level / MAX_LEVEL * 0.3, rng)


def _translation(const: float, level: float, sample: Sample, hp: AutoAugmentHparams,
                 rng: np.random.Generator) -> float:
    return float(round(_signed(hp.pixels(const, level, sample["image"].shape), rng)))


def _solarize_threshold(level: float) -> int:
    return int(level / MAX_LEVEL * 256)


# colour ------------------------------------------------------------------------------------------


@_register("AutoContrast")
def _autocontrast(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams
                  ) -> Sample:
    return _with_image(s, autocontrast(s["image"]))


@_register("Equalize")
def _equalize(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams) -> Sample:
    return _with_image(s, equalize(s["image"]))


@_register("Posterize")
def _posterize(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams
               ) -> Sample:
    return _with_image(s, posterize(s["image"], int(level / MAX_LEVEL * 4)))


@_register("Solarize")
def _solarize(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams) -> Sample:
    return _with_image(s, solarize(s["image"], _solarize_threshold(level)))


@_register("SolarizeAdd")
def _solarize_add(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams
                  ) -> Sample:
    return _with_image(s, solarize_add(s["image"], int(level / MAX_LEVEL * 110)))


@_register("Color")
def _color(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams) -> Sample:
    return _with_image(s, color(s["image"], _enhance_factor(level)))


@_register("Contrast")
def _contrast(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams) -> Sample:
    return _with_image(s, contrast(s["image"], _enhance_factor(level)))


@_register("Brightness")
def _brightness(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams
                ) -> Sample:
    return _with_image(s, brightness(s["image"], _enhance_factor(level)))


@_register("Sharpness")
def _sharpness(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams
               ) -> Sample:
    return _with_image(s, sharpness(s["image"], _enhance_factor(level)))


@_register("Cutout")
def _cutout(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams) -> Sample:
    return _with_image(s, cutout(s["image"], int(hp.pixels(hp.cutout_const, level, s["image"].shape)), rng))


@_register("BBox_Cutout")
def _bbox_cutout(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams
                 ) -> Sample:
    return bbox_cutout(s, level / MAX_LEVEL * hp.cutout_max_pad_fraction, rng)


# whole-image geometry ---------------------------------------------------------------------------


@_register("Rotate_BBox", geometric=True)
def _rotate(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams) -> Sample:
    return warp_sample(s, rotate_matrix(_degrees(level, rng), *_hw(s)))


@_register("TranslateX_BBox", geometric=True)
def _translate_x(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams
                 ) -> Sample:
    return warp_sample(s, translate_matrix(_translation(hp.translate_const, level, s, hp, rng), True, *_hw(s)))


@_register("TranslateY_BBox", geometric=True)
def _translate_y(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams
                 ) -> Sample:
    return warp_sample(s, translate_matrix(_translation(hp.translate_const, level, s, hp, rng), False, *_hw(s)))


@_register("ShearX_BBox", geometric=True)
def _shear_x(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams) -> Sample:
    return warp_sample(s, shear_matrix(_shear(level, rng), True, *_hw(s)))


@_register("ShearY_BBox", geometric=True)
def _shear_y(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams) -> Sample:
    return warp_sample(s, shear_matrix(_shear(level, rng), False, *_hw(s)))


@_register("Flip", geometric=True)
def _flip(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams) -> Sample:
    return warp_sample(s, flip_matrix(*_hw(s)))


# inside each box (the magnitude's sign is drawn per box, as the release evaluates it per box) ------


def _in_boxes(s: Sample, prob: float, rng: np.random.Generator, **kwargs: Any) -> Sample:
    return apply_in_boxes(s, prob * BBOX_ONLY_PROB_SCALE, rng, **kwargs)


@_register("Rotate_Only_BBoxes", in_boxes=True, geometric=True)
def _rotate_in_boxes(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams
                     ) -> Sample:
    return _in_boxes(s, prob, rng, matrix_fn=lambda h, w: rotate_matrix(_degrees(level, rng), h, w))


@_register("ShearX_Only_BBoxes", in_boxes=True, geometric=True)
def _shear_x_in_boxes(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams
                      ) -> Sample:
    return _in_boxes(s, prob, rng, matrix_fn=lambda h, w: shear_matrix(_shear(level, rng), True, h, w))


@_register("ShearY_Only_BBoxes", in_boxes=True, geometric=True)
def _shear_y_in_boxes(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams
                      ) -> Sample:
    return _in_boxes(s, prob, rng, matrix_fn=lambda h, w: shear_matrix(_shear(level, rng), False, h, w))


@_register("TranslateX_Only_BBoxes", in_boxes=True, geometric=True)
def _translate_x_in_boxes(s: Sample, level: float, prob: float, rng: np.random.Generator,
                          hp: AutoAugmentHparams) -> Sample:
    return _in_boxes(s, prob, rng, matrix_fn=lambda h, w: translate_matrix(
        _translation(hp.translate_bbox_const, level, s, hp, rng), True, h, w))


@_register("TranslateY_Only_BBoxes", in_boxes=True, geometric=True)
def _translate_y_in_boxes(s: Sample, level: float, prob: float, rng: np.random.Generator,
                          hp: AutoAugmentHparams) -> Sample:
    return _in_boxes(s, prob, rng, matrix_fn=lambda h, w: translate_matrix(
        _translation(hp.translate_bbox_const, level, s, hp, rng), False, h, w))


@_register("Flip_Only_BBoxes", in_boxes=True, geometric=True)
def _flip_in_boxes(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams
                   ) -> Sample:
    return _in_boxes(s, prob, rng, matrix_fn=flip_matrix)


@_register("Solarize_Only_BBoxes", in_boxes=True)
def _solarize_in_boxes(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams
                       ) -> Sample:
    return _in_boxes(s, prob, rng, pixel_op=lambda crop: solarize(crop, _solarize_threshold(level)))


@_register("Equalize_Only_BBoxes", in_boxes=True)
def _equalize_in_boxes(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams
                       ) -> Sample:
    return _in_boxes(s, prob, rng, pixel_op=equalize)


@_register("Cutout_Only_BBoxes", in_boxes=True)
def _cutout_in_boxes(s: Sample, level: float, prob: float, rng: np.random.Generator, hp: AutoAugmentHparams
                     ) -> Sample:
    pad = int(hp.pixels(hp.cutout_bbox_const, level, s["image"].shape))
    return _in_boxes(s, prob, rng, pixel_op=lambda crop: cutout(crop, pad, rng))
