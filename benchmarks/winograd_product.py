"""The batched product inside a Winograd convolution: the C kernel on packed filters against torch.bmm.

Usage:
    python benchmarks/winograd_product.py [--rounds 5]

``native_winograd_f4`` computes a 3x3 convolution as input transform, batched product, output
transform, one strip of tile rows at a time.  The product multiplies, for each of the 36 tile positions,
the strip's transformed tiles ``[count, C]`` by that position's filters ``[C, K]``.  The shapes below are
RetinaNet R50-FPN's at 800 px as the engine cuts them into strips: the head towers and the FPN
(256 -> 256), the classifier (256 -> 819, strips four times longer where its filters exceed half the
cache), and ResNet-50's stages (64, 128, 512 channels).

Both sides run in this process on the same inputs: ``torch.bmm`` (the BLAS; the reference) and
``_winograd_native.batched_product`` on ``pack_filters``' layout (AVX-512 only: without it the engine
uses ``torch.bmm`` and this benchmark says so and stops).  Each shape gives both sides' GFLOP/s (best of
``--rounds``) and the largest difference from ``torch.bmm`` relative to the largest product.  The last
line gives the ratio over all shapes together: reference seconds / C kernel seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from vision.inference import winograd

# (tiles per strip, input channels, output channels) as native_winograd_f4 cuts an 800 x 1088 image: the
# head and FPN at P3 and P5, the classifier at P3, ResNet-50's layers 1 to 4
SHAPES = [(68, 256, 256), (63, 256, 256), (272, 256, 819), (340, 64, 64), (170, 128, 128), (85, 256, 256),
          (45, 512, 512)]


def best_seconds(fn, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(10):
            fn()
        best = min(best, (time.perf_counter() - start) / 10)
    return best


def measure(count: int, c: int, k: int, rounds: int) -> tuple[float, float, float]:
    """Seconds of torch.bmm and of the C kernel for one shape, and their largest relative difference."""
    g = torch.Generator().manual_seed(count + c + k)
    transformed, filters = torch.randn(36, count, c, generator=g), torch.randn(36, c, k, generator=g)
    packed, products, reference = winograd.pack_filters(filters), torch.empty(36, count, k), torch.empty(36, count, k)

    def native() -> None:
        winograd._winograd_native.batched_product(transformed.data_ptr(), (count, c), packed.data_ptr(), k,
                                                  products.data_ptr())

    t_reference = best_seconds(lambda: torch.bmm(transformed, filters, out=reference), rounds)
    t_native = best_seconds(native, rounds)
    return t_reference, t_native, ((products - reference).abs().max() / reference.abs().max()).item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    if not winograd.NATIVE_PRODUCT:
        print("this CPU has no AVX-512 (or the extension is not built): the engine uses torch.bmm")
        return 0
    total_reference = total_native = 0.0
    for count, c, k in SHAPES:
        t_reference, t_native, difference = measure(count, c, k, args.rounds)
        flops = 2 * 36 * count * c * k
        print(f"{count:4d} tiles, {c:3d} -> {k:3d} channels: torch.bmm {flops / t_reference / 1e9:5.0f} GFLOP/s, "
              f"C kernel {flops / t_native / 1e9:5.0f} GFLOP/s ({t_reference / t_native:.2f}x), "
              f"largest difference {difference:.1e}", flush=True)
        total_reference += t_reference
        total_native += t_native
    print(f"batched product, all shapes: torch.bmm {total_reference * 1e3:.1f} ms, C kernel {total_native * 1e3:.1f} ms: "
          f"{total_reference / total_native:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
