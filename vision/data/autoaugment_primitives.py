"""The pixel, geometry and in-box primitives detection AutoAugment's named operations are built from.

Colour operations take and return images; geometric ones are forward affine matrices applied to the
image, the instance masks and the boxes alike; ``apply_in_boxes`` runs an operation on each box's
pixels alone.  ``autoaugment_ops.py`` says which choices they make where the published release is
ambiguous.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
from albumentations.augmentations.pixel import functional as albu_pixel
from PIL import Image, ImageEnhance, ImageOps

FILL = 128  # grey written where a warp or cutout uncovers pixels

Sample = dict[str, Any]


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
