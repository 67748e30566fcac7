"""What the synthetic data set draws: the shapes (its classes) and the backgrounds and fills around them.

Shapes are polygons in unit coordinates; textures are float32 HxWx3 arrays in [0, 255].  The textured
style hides the shapes among noise, gradients and stripes; the plain style (the demo's) puts flat
shapes on a gently shaded background.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

Polys = list[np.ndarray]  # each an (N, 2) array of x, y
ShapeFn = Callable[[np.random.Generator], tuple[Polys, Polys]]


# --------------------------------------------------------------------------------------------------
# Shapes.  Each returns (polygons to fill, polygons to cut out) in unit coordinates around the origin;
# they are normalised afterwards so that the farthest vertex lies at radius 1.


def _ngon(n: int, radius: float = 1.0, phase: float = 0.0, aspect: float = 1.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * aspect * np.sin(t)], 1)


def _star_polygon(points: int, inner: float) -> np.ndarray:
    t = -np.pi / 2 + np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _circle(rng: np.random.Generator) -> tuple[Polys, Polys]:
    return [_ngon(64)], []


def _ellipse(rng: np.random.Generator) -> tuple[Polys, Polys]:
    return [_ngon(64, aspect=rng.uniform(0.35, 0.65))], []


def _square(rng: np.random.Generator) -> tuple[Polys, Polys]:
    return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)], []


def _triangle(rng: np.random.Generator) -> tuple[Polys, Polys]:
    t = -np.pi / 2 + 2 * np.pi * np.arange(3) / 3 + rng.uniform(-0.3, 0.3, 3)
    return [np.stack([np.cos(t), np.sin(t)], 1)], []


def _star(rng: np.random.Generator) -> tuple[Polys, Polys]:
    return [_star_polygon(5, rng.uniform(0.38, 0.5))], []


def _cross(rng: np.random.Generator) -> tuple[Polys, Polys]:
    a = rng.uniform(0.2, 0.32)
    pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
           (-1, -a), (-a, -a)]
    return [np.array(pts, float)], []


def _pentagon(rng: np.random.Generator) -> tuple[Polys, Polys]:
    return [_ngon(5, phase=-np.pi / 2)], []


def _hexagon(rng: np.random.Generator) -> tuple[Polys, Polys]:
    return [_ngon(6)], []


def _ring(rng: np.random.Generator) -> tuple[Polys, Polys]:
    return [_ngon(64)], [_ngon(64, radius=rng.uniform(0.45, 0.65))]


def _diamond(rng: np.random.Generator) -> tuple[Polys, Polys]:
    b = rng.uniform(0.45, 0.65)
    return [np.array([[1, 0], [0, b], [-1, 0], [0, -b]], float)], []


def _arrow(rng: np.random.Generator) -> tuple[Polys, Polys]:
    s, h, x = rng.uniform(0.14, 0.22), rng.uniform(0.4, 0.55), rng.uniform(0.0, 0.3)
    pts = [(-1, -s), (x, -s), (x, -h), (1, 0), (x, h), (x, s), (-1, s)]
    return [np.array(pts, float)], []


def _crescent(rng: np.random.Generator) -> tuple[Polys, Polys]:
    r, d = rng.uniform(0.75, 0.9), rng.uniform(0.35, 0.55)
    return [_ngon(64)], [_ngon(64, radius=r) + np.array([d, 0.0])]


def _heart(rng: np.random.Generator) -> tuple[Polys, Polys]:
    t = 2 * np.pi * np.arange(64) / 64
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return [np.stack([x, y + 2.5], 1)], []


def _semicircle(rng: np.random.Generator) -> tuple[Polys, Polys]:
    t = np.pi * np.arange(33) / 32
    return [np.stack([np.cos(t), np.sin(t) - 0.4], 1)], []


def _trapezoid(rng: np.random.Generator) -> tuple[Polys, Polys]:
    top, h = rng.uniform(0.35, 0.6), rng.uniform(0.55, 0.8)
    return [np.array([[-1, h], [1, h], [top, -h], [-top, -h]], float)], []


def _chevron(rng: np.random.Generator) -> tuple[Polys, Polys]:
    w, d = rng.uniform(0.3, 0.45), rng.uniform(0.6, 0.9)
    pts = [(-1, -d), (0, d - 2 * w), (1, -d), (1, -d + w * 1.6), (0, d), (-1, -d + w * 1.6)]
    return [np.array(pts, float)], []


SHAPES: dict[str, ShapeFn] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "star": _star, "ellipse": _ellipse,
    "cross": _cross, "pentagon": _pentagon, "hexagon": _hexagon, "ring": _ring, "diamond": _diamond,
    "arrow": _arrow, "crescent": _crescent, "heart": _heart, "semicircle": _semicircle,
    "trapezoid": _trapezoid, "chevron": _chevron,
}


# --------------------------------------------------------------------------------------------------
# Textures: float32 HxWx3 arrays in [0, 255].


def random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _projection(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Pixel positions projected on a random direction: the phase of gradients and stripes."""
    a = rng.uniform(0, 2 * np.pi)
    return (np.arange(h, dtype=np.float32)[:, None] * math.sin(a)
            + np.arange(w, dtype=np.float32)[None, :] * math.cos(a))


def _blend(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    c0, c1 = random_colour(rng), random_colour(rng)
    return c0 + t[..., None] * (c1 - c0)


def _smooth_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    cells = int(rng.integers(2, 12))
    small = rng.uniform(0, 255, (cells, max(2, round(cells * w / h)), 3)).astype(np.float32)
    return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255)


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    p = _projection(rng, h, w)
    lo = float(p.min())
    return _blend(rng, (p - lo) / max(float(p.max()) - lo, 1.0))


def _stripes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    phase = _projection(rng, h, w) / np.float32(rng.uniform(4, 40))
    if rng.random() < 0.5:
        t = (phase % 1.0 < rng.uniform(0.3, 0.7)).astype(np.float32)
    else:
        t = 0.5 + 0.5 * np.sin(np.float32(2 * np.pi) * phase)
    return _blend(rng, t)


_TEXTURES = (_smooth_noise, _gradient, _stripes)


def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return _TEXTURES[int(rng.integers(len(_TEXTURES)))](rng, h, w)


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    img = texture(rng, h, w)
    if rng.random() < 0.5:
        alpha = rng.uniform(0.2, 0.6)
        img = (1 - alpha) * img + alpha * texture(rng, h, w)
    # Unannotated clutter: irregular colour blobs (thresholded smooth noise) and lines.
    for _ in range(int(rng.integers(0, 5))):
        field = np.zeros((h, w), np.float32)
        for cells, weight in ((int(rng.integers(3, 8)), 1.0), (int(rng.integers(10, 20)), 0.5)):
            small = rng.random((cells, max(2, round(cells * w / h)))).astype(np.float32)
            field += weight * cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        blob = field > rng.uniform(1.05, 1.3)
        img[blob] = (1 - 0.8) * img[blob] + 0.8 * random_colour(rng)
    for _ in range(int(rng.integers(0, 4))):
        p0 = (int(rng.integers(w)), int(rng.integers(h)))
        p1 = (int(rng.integers(w)), int(rng.integers(h)))
        cv2.line(img, p0, p1, random_colour(rng).tolist(), int(rng.integers(1, 4)), cv2.LINE_AA)
    return img


def plain_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A flat colour shading gently into a near one: nothing in it looks like an object."""
    c0 = random_colour(rng)
    c1 = np.clip(c0 + rng.uniform(-30, 30, 3), 0, 255).astype(np.float32)
    p = _projection(rng, h, w)
    lo = float(p.min())
    t = (p - lo) / max(float(p.max()) - lo, 1.0)
    return c0 + t[..., None] * (c1 - c0)


def plain_fill(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A flat colour far from the colour underneath (the best of a few draws)."""
    under = img[mask].mean(0)
    best, best_gap = random_colour(rng), -1.0
    for _ in range(16):
        colour = random_colour(rng)
        gap = float(np.abs(colour - under).sum())
        if gap > best_gap:
            best, best_gap = colour, gap
        if gap >= 240:
            break
    return np.broadcast_to(best, (int(mask.sum()), 3))


def textured_fill(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pixels for a shape: a flat colour or a texture, kept away from the colour underneath."""
    under = img[mask].mean(0)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    best, best_gap = None, -1.0
    for _ in range(8):
        if rng.random() < 0.65:
            colour = random_colour(rng)
            pixels = np.broadcast_to(colour, (int(mask.sum()), 3))
        else:
            pixels = texture(rng, int(y1 - y0), int(x1 - x0))[mask[y0:y1, x0:x1]]
            colour = pixels.mean(0)
        gap = float(np.abs(colour - under).sum())
        if gap > best_gap:
            best, best_gap = pixels, gap
        if gap >= 120:
            break
    return best
