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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from albumentations.augmentations.pixel import functional as albu_pixel
from PIL import Image, ImageEnhance, ImageOps

FILL = 128  # grey written where a warp or cutout uncovers pixels
MAX_LEVEL = 10.0
BBOX_ONLY_PROB_SCALE = 1.0 / 3.0  # per-box probability of *_Only_BBoxes ops = policy probability / 3

Sample = dict[str, Any]


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
# colour operations: image -> image


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(image))


def autocontrast(image: np.ndarray) -> np.ndarray:
    return np.array(ImageOps.autocontrast(_pil(image)))


def equalize(image: np.ndarray) -> np.ndarray:
    # PIL's equalize, which the release reproduces (albumentations' "pil" mode shifts the LUT by one bin).
    return np.array(ImageOps.equalize(_pil(image)))


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
    bits = int(bits)
    if bits >= 8:
        return image
    return albu_pixel.posterize(image, max(bits, 1))


def solarize(image: np.ndarray, threshold: int) -> np.ndarray:
    lut = np.arange(256, dtype=np.uint8)
    lut = np.where(lut < threshold, lut, 255 - lut).astype(np.uint8)
    return cv2.LUT(image, lut)


def solarize_add(image: np.ndarray, addition: int, threshold: int = 128) -> np.ndarray:
    lut = np.arange(256, dtype=np.int64)
    lut = np.where(lut < threshold, np.clip(lut + addition, 0, 255), lut).astype(np.uint8)
    return cv2.LUT(image, lut)


def _enhance(kind: type) -> Callable[[np.ndarray, float], np.ndarray]:
    def op(image: np.ndarray, factor: float) -> np.ndarray:
        return np.array(kind(_pil(image)).enhance(factor))

    return op


color = _enhance(ImageEnhance.Color)
contrast = _enhance(ImageEnhance.Contrast)
brightness = _enhance(ImageEnhance.Brightness)
sharpness = _enhance(ImageEnhance.Sharpness)


def cutout(image: np.ndarray, pad_size: int, rng: np.random.Generator) -> np.ndarray:
    """Fills a (2*pad_size)^2 square centred uniformly in the image (clipped at its borders) with grey."""
    h, w = image.shape[:2]
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    out = image.copy()
    out[max(0, cy - pad_size) : min(h, cy + pad_size), max(0, cx - pad_size) : min(w, cx + pad_size)] = FILL
    return out


# --------------------------------------------------------------------------------------------------
# geometry: forward affine matrices (input pixel index -> output pixel index) for an (h, w) canvas


def translate_matrix(pixels: float, horizontal: bool, h: int, w: int) -> np.ndarray:
    dx, dy = (-pixels, 0.0) if horizontal else (0.0, -pixels)
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])


def shear_matrix(level: float, horizontal: bool, h: int, w: int) -> np.ndarray:
    # The release samples input (x + level*y, y) for output (x, y): a shear about the top-left corner.
    if horizontal:
        return np.array([[1.0, -level, 0.0], [0.0, 1.0, 0.0]])
    return np.array([[1.0, 0.0, 0.0], [-level, 1.0, 0.0]])


def rotate_matrix(degrees: float, h: int, w: int) -> np.ndarray:
    return cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), degrees, 1.0)


def flip_matrix(h: int, w: int) -> np.ndarray:
    return np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0]])


def _warp(array: np.ndarray, matrix: np.ndarray, fill: int) -> np.ndarray:
    h, w = array.shape[:2]
    return cv2.warpAffine(
        array, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
        borderValue=(fill, fill, fill, fill),
    )


def _warp_masks(masks: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Warps [N, H, W] masks, up to 512 at a time (OpenCV's channel limit)."""
    if len(masks) == 0:
        return masks.copy()
    chunks = []
    for i in range(0, len(masks), 512):
        hwc = np.ascontiguousarray(masks[i : i + 512].transpose(1, 2, 0))
        out = _warp(hwc, matrix, 0)
        chunks.append(out.reshape(out.shape[0], out.shape[1], -1).transpose(2, 0, 1))
    return np.ascontiguousarray(np.concatenate(chunks, 0))


def mask_boxes(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tight xyxy boxes of [N, H, W] masks (pixel-edge convention) and which masks are non-empty."""
    n = len(masks)
    boxes = np.zeros((n, 4), np.float32)
    rows, cols = masks.any(2), masks.any(1)
    keep = rows.any(1)
    for i in np.flatnonzero(keep):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes, keep


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray, h: int, w: int) -> np.ndarray:
    """The box around each box's transformed corners, after cutting that quadrilateral to the image.

    Cutting the quadrilateral before taking its box (rather than clipping the box) keeps a rotated or
    sheared box that pokes out of the image tight around the part that is still inside.  Boxes are in
    continuous coordinates (pixel i spans [i, i+1]) while the matrix maps pixel centres, hence the
    half-pixel shifts.  A box wholly outside comes back empty.
    """
    if len(boxes) == 0:
        return boxes.astype(np.float32)
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) - 0.5 for i in range(4))
    xs = np.stack([x1, x2, x2, x1], 1)  # corners in polygon order
    ys = np.stack([y1, y1, y2, y2], 1)
    a = matrix
    tx = a[0, 0] * xs + a[0, 1] * ys + a[0, 2] + 0.5
    ty = a[1, 0] * xs + a[1, 1] * ys + a[1, 2] + 0.5
    out = np.stack([tx.min(1), ty.min(1), tx.max(1), ty.max(1)], 1)
    outside = (out[:, 0] < 0) | (out[:, 1] < 0) | (out[:, 2] > w) | (out[:, 3] > h)
    frame = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    for i in np.flatnonzero(outside):
        quad = np.stack([tx[i], ty[i]], 1).astype(np.float32)
        area, poly = cv2.intersectConvexConvex(quad, frame)
        if area <= 0 or poly is None:
            out[i] = 0.0
            continue
        poly = poly.reshape(-1, 2)
        out[i] = (poly[:, 0].min(), poly[:, 1].min(), poly[:, 0].max(), poly[:, 1].max())
    out[:, 0::2] = out[:, 0::2].clip(0, w)
    out[:, 1::2] = out[:, 1::2].clip(0, h)
    return out.astype(np.float32)


def select(sample: Sample, keep: np.ndarray) -> Sample:
    """The sample with only the instances where ``keep`` is true, across boxes, labels and masks."""
    out = dict(sample)
    out["boxes"] = sample["boxes"][keep]
    out["labels"] = sample["labels"][keep]
    if "masks" in sample:
        out["masks"] = sample["masks"][keep]
    return out


def _visible(boxes: np.ndarray) -> np.ndarray:
    return ((boxes[:, 2] - boxes[:, 0]) >= 1.0) & ((boxes[:, 3] - boxes[:, 1]) >= 1.0)


def warp_sample(sample: Sample, matrix: np.ndarray) -> Sample:
    """Applies one affine warp to the image, its masks and its boxes; drops instances that left it."""
    image = sample["image"]
    h, w = image.shape[:2]
    out = dict(sample)
    out["image"] = _warp(image, matrix, FILL)
    if "masks" in sample:
        out["masks"] = _warp_masks(sample["masks"], matrix)
        boxes, keep = mask_boxes(out["masks"])
        out["boxes"] = boxes
    else:
        out["boxes"] = transform_boxes(sample["boxes"], matrix, h, w)
        keep = np.ones(len(out["boxes"]), bool)
    return select(out, keep & _visible(out["boxes"]))


# --------------------------------------------------------------------------------------------------
# operations inside boxes


def box_region(box: np.ndarray, h: int, w: int) -> tuple[int, int, int, int]:
    """The pixels a box covers, as slice bounds (x0, y0, x1, y1) inside the image."""
    x0 = min(max(math.floor(box[0]), 0), w)
    y0 = min(max(math.floor(box[1]), 0), h)
    x1 = min(max(math.ceil(box[2]), x0), w)
    y1 = min(max(math.ceil(box[3]), y0), h)
    return x0, y0, x1, y1


def apply_in_boxes(
    sample: Sample,
    prob: float,
    rng: np.random.Generator,
    pixel_op: Callable[[np.ndarray], np.ndarray] | None = None,
    matrix_fn: Callable[[int, int], np.ndarray] | None = None,
) -> Sample:
    """Applies an operation to each box's content with probability ``prob``, boxes in random order.

    ``pixel_op`` changes the colours of a crop; ``matrix_fn(h, w)`` gives a warp of a crop, which moves
    the masks inside the crop too.  Boxes follow their masks when there are masks, else stay put.
    """
    boxes = sample["boxes"]
    if len(boxes) == 0:
        return sample
    image = sample["image"].copy()
    masks = sample["masks"].copy() if "masks" in sample else None
    h, w = image.shape[:2]
    touched = np.zeros(len(boxes), bool)
    for i in rng.permutation(len(boxes)):
        if rng.random() >= prob:
            continue
        x0, y0, x1, y1 = box_region(boxes[i], h, w)
        if x1 <= x0 or y1 <= y0:
            continue
        crop = np.ascontiguousarray(image[y0:y1, x0:x1])
        if matrix_fn is None:
            image[y0:y1, x0:x1] = pixel_op(crop)
            continue
        matrix = matrix_fn(y1 - y0, x1 - x0)
        image[y0:y1, x0:x1] = _warp(crop, matrix, FILL)
        if masks is not None:
            inside = masks[:, y0:y1, x0:x1]
            hit = inside.reshape(len(masks), -1).any(1)
            if hit.any():
                masks[hit, y0:y1, x0:x1] = _warp_masks(inside[hit], matrix)
                touched |= hit
    out = dict(sample)
    out["image"] = image
    if masks is None or not touched.any():
        if masks is not None:
            out["masks"] = masks
        return out
    out["masks"] = masks
    new_boxes, nonempty = mask_boxes(masks[touched])
    all_boxes = boxes.copy()
    all_boxes[touched] = new_boxes
    keep = np.ones(len(boxes), bool)
    keep[touched] = nonempty
    out["boxes"] = all_boxes
    return select(out, keep)


def bbox_cutout(sample: Sample, pad_fraction: float, rng: np.random.Generator) -> Sample:
    """Greys out a rectangle centred inside one randomly chosen box, sized as a fraction of that box."""
    boxes = sample["boxes"]
    if len(boxes) == 0:
        return sample
    image = sample["image"]
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box_region(boxes[int(rng.integers(0, len(boxes)))], h, w)
    if x1 <= x0 or y1 <= y0:
        return sample
    pad_h = int(pad_fraction * (y1 - y0) / 2)
    pad_w = int(pad_fraction * (x1 - x0) / 2)
    cy, cx = int(rng.integers(y0, y1)), int(rng.integers(x0, x1))
    out = dict(sample)
    out["image"] = image.copy()
    out["image"][max(0, cy - pad_h) : min(h, cy + pad_h), max(0, cx - pad_w) : min(w, cx + pad_w)] = FILL
    return out


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
