"""3x3 convolutions by Winograd's minimal filtering, F(4x4, 3x3) and F(2x2, 3x3), for float32 inference
on a CPU.

A detector spends most of its arithmetic in 3x3, stride-1 convolutions (RetinaNet's head towers are
about half of it).  oneDNN computes them directly, 9 multiply-adds per input channel per output, and on
a CPU it already runs near the machine's peak there, so only less arithmetic makes them faster.
Winograd's algorithm computes each m x m output tile from an (m + 2) x (m + 2) input tile with
(m + 2)^2 products instead of 9 m^2: the work becomes three small matrix products around one large
batched one (``torch.bmm``), which runs near peak as well.

Two tile sizes, which differ in rounding:

- F(4x4, 3x3): 2.25 multiply-adds per output and channel instead of 9.  Its transforms hold 1/4, 1/6,
  1/12, 1/24 and powers of 2 up to 8, so its errors are about 1e-5 of the output's magnitude against
  about 1e-6 for the direct convolution.  Measured on a 2-core CPU for 256 -> 256 channels at
  100 x 156 (RetinaNet's P3), 25 ms against oneDNN's 53 ms.  The engine's default.
- F(2x2, 3x3): 4 multiply-adds per output and channel.  Its transforms hold only 0, 1 and 1/2, and
  its errors are below the direct convolution's (5e-7 against 1.3e-6 to 1.9e-6 of the output's
  magnitude, from 128 to 512 channels); it takes 1.4 times less time than oneDNN at 256 channels
  and 1.1 times less at 128.

For F(4x4, 3x3) the two transforms run in C where the extension was built (``_winograd_native.c``,
``native_winograd_f4``): one pass over memory each, with the bias, a ResNet block's residual and the
ReLU applied as the output is written.  As tensor operations (``winograd_conv3x3``, also F(2x2)) they are
several passes each and cost as much as the product itself; in C a 256-channel convolution at RetinaNet's
P3 takes about two thirds of the time, and convolutions from 64 input channels (ResNet's first stage)
gain over the direct kernel too.

On CPUs with AVX-512 the batched product runs in C as well (``batched_product``), on filters packed once
per model (``pack_filters``): the BLAS behind ``torch.bmm`` repacks each tile position's filters on every
call, for the few dozen to few hundred tiles of a strip, and on a 2-core AMD EPYC reached 127-183
GFLOP/s there against the C kernel's 193-220 (``benchmarks/winograd_product.py``; a 256-channel
convolution at RetinaNet's P3: 24 ms against 29).  Elsewhere ``torch.bmm`` computes it.

It is exact arithmetic reordered, so the result equals the convolution up to float32 rounding.
PyTorch's convolution stays the reference the tests compare with.  Only float32 on a CPU takes this
path: cuDNN chooses Winograd kernels itself, and reduced precision would lose too much in the
transforms.

``use_winograd`` rewrites the eligible ``nn.Conv2d`` of a model in place (their class changes, their
parameters and state_dict do not); the transformed weights are computed once, in float64, so the
model is for inference: it must not be trained afterwards.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from vision.inference.fused_conv import FusedConv2d

try:  # the F(4x4, 3x3) transforms in C (built at install where a C compiler with OpenMP was found)
    from vision.inference import _winograd_native
except ImportError:
    _winograd_native = None
# Its batched product too, on CPUs with AVX-512, with the filters packed once (``pack_filters``)
NATIVE_PRODUCT = _winograd_native is not None and _winograd_native.has_batched_product()
# output channels per packed block: the C kernel's width (only packing for it needs one)
_PACKED_COLUMNS = _winograd_native.PACKED_COLUMNS if _winograd_native is not None else 32

# Y = A^T [(G g G^T) * (B^T d B)] A for an (m + 2) x (m + 2) tile d and a 3x3 filter g (Lavin & Gray, 2016),
# by output tile side m: (B^T, G, A^T).
_MATRICES = {
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
         (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
         (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
    2: (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
}
TILES = tuple(_MATRICES)  # output tile sides: 4 (fewest products) and 2 (rounding below the direct kernel's)
_MIN_PIXELS = 16 * 16  # below this the transforms' fixed cost outweighs the saving: the direct kernel runs
# Narrower convolutions are memory-bound: fewer multiplications do not repay transforms made of tensor
# operations, while the one-pass native transforms still beat the direct kernel at 64 channels.
_MIN_IN_CHANNELS = 128
_MIN_IN_CHANNELS_NATIVE = 64
_MIN_OUT_CHANNELS = 64  # with torch.bmm's product RetinaNet's 36-channel box regressor runs faster directly;
# with the C product it takes 1.7x (P3) to 2.1x (P4) less time by Winograd, though its 36 channels fill two
# 32-wide column blocks
_MIN_OUT_CHANNELS_NATIVE_PRODUCT = 32
_STRIP_VALUES = 36 * 96 * 256  # transformed values per strip: about 3.5 MB
_FILTERS_PER_PIECE = 8192  # 3x3 filters transformed at a time (2.4 MB of float64 values for F(4x4))
# Every strip reads all of a convolution's filters again.  Where they do not fit in the last-level cache
# (RetinaNet's 819-channel classifier: 30 MB as Winograd filters) that read comes from memory, and strips
# this many times longer take 7-17% less time; filters that stay in the cache gain nothing from it.
_LONG_STRIPS = 4


def _last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux's sysfs), 32 MiB where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip()
            sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 * 2**20)


_CACHE_BYTES = _last_level_cache_bytes()


def winograd_filters(weight: torch.Tensor, tile: int = 4) -> torch.Tensor:
    """``[K, C, 3, 3]`` filters -> ``[(tile + 2)^2, C, K]``: G g G^T for every filter, in float64 then
    rounded once."""
    g = torch.tensor(_MATRICES[tile][1], dtype=torch.float64, device=weight.device)
    k, c = weight.shape[:2]
    # (G g G^T)[i, m] = sum over j, l of (G (x) G)[(i, m), (j, l)] g[j, l]: a product over all filters,
    # taken in input-channel-major order so that the result is [t * t, C * K] as it is kept, and in
    # pieces whose float64 values stay in cache until they are rounded
    kron = torch.kron(g, g)
    filters = weight.detach().transpose(0, 1).reshape(c * k, 9)
    out = weight.new_empty((tile + 2) ** 2, c * k)
    for start in range(0, c * k, _FILTERS_PER_PIECE):
        piece = filters[start : start + _FILTERS_PER_PIECE].double()
        out[:, start : start + len(piece)] = kron @ piece.T
    return out.view((tile + 2) ** 2, c, k)


def pack_filters(filters: torch.Tensor) -> torch.Tensor:
    """F(4x4, 3x3) filters ``[36, C, K]`` -> ``[36, ceil(K / 32), C, 32]``, zeros past K: the layout the
    C batched product reads, each block of 32 output channels of a tile position in one run of memory."""
    positions, c, k = filters.shape
    blocks = -(-k // _PACKED_COLUMNS)
    padded = filters.new_zeros(positions, c, blocks * _PACKED_COLUMNS)
    padded[:, :, :k] = filters
    return padded.view(positions, c, blocks, _PACKED_COLUMNS).permute(0, 2, 1, 3).contiguous()


@lru_cache(maxsize=16)
def _transforms(device: torch.device, dtype: torch.dtype, tile: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output transforms as matrices on flattened tiles: vec(B^T d B) = (B^T (x) B^T) vec(d)."""
    bt = torch.tensor(_MATRICES[tile][0], dtype=torch.float64)
    at = torch.tensor(_MATRICES[tile][2], dtype=torch.float64)
    return (torch.kron(bt, bt).to(device, dtype), torch.kron(at, at).to(device, dtype))


def _tile_of(filters: torch.Tensor) -> int:
    """The output tile side that ``winograd_filters`` made ``filters`` for: (tile + 2)^2 rows."""
    return round(filters.shape[0] ** 0.5) - 2


def winograd_conv3x3(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None,
                     input_transform: torch.Tensor, output_transform: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for ``filters = winograd_filters(weight, tile)`` and
    ``_transforms(..., tile)`` (the tile size follows from the filters' shape), then a ReLU where ``relu``.

    ``x`` is ``[N, C, H, W]``, ideally ``channels_last``: tiles are cut from its NHWC view, and the
    result is ``[N, K, H, W]`` in ``channels_last`` memory, as oneDNN's convolution returns it.  A large
    map goes through in strips of tile rows, so that each strip's transformed tiles stay in cache
    between the three products (whole, a P3 map's are 2.25 times its 14 MB, and the batched product
    then runs at half speed).
    """
    n, c, h, w = x.shape
    k = filters.shape[2]
    tile = _tile_of(filters)
    size = tile + 2  # input tile side
    tiles_h, tiles_w = -(-h // tile), -(-w // tile)
    padded = _zero_padded(x.permute(0, 2, 3, 1), tile * tiles_h + 2, tile * tiles_w + 2)
    out = torch.empty(n, tile * tiles_h, tile * tiles_w, k, dtype=x.dtype, device=x.device)
    rows = max(1, _STRIP_VALUES // (size * size * c * tiles_w * n))
    for r0 in range(0, tiles_h, rows):
        r1 = min(tiles_h, r0 + rows)
        strip = padded[:, tile * r0 : tile * r1 + 2]
        tiles = strip.unfold(1, size, tile).unfold(2, size, tile)  # [N, rows, tw, C, s, s], overlapping views
        tiles = tiles.permute(4, 5, 0, 1, 2, 3).reshape(size * size, -1)  # [s*s, N*rows*tw*C]: one copy
        transformed = (input_transform @ tiles).view(size * size, -1, c)
        products = torch.bmm(transformed, filters)  # [s*s, tiles, K]: the bulk of the arithmetic
        result = (output_transform @ products.view(size * size, -1)).view(tile, tile, n, r1 - r0, tiles_w, k)
        target = out[:, tile * r0 : tile * r1]
        target.view(n, r1 - r0, tile, tiles_w, tile, k).copy_(result.permute(2, 3, 0, 4, 1, 5))
        if bias is not None:
            target.add_(bias)  # while the strip is in cache
        if relu:
            target.relu_()
    if out.shape[2] != w or (n > 1 and out.shape[1] != h):
        out = out[:, :h, :w].contiguous()
    elif out.shape[1] != h:  # one image, whole rows: the first h rows are already contiguous
        out = out.as_strided((n, h, w, k), (h * w * k, w * k, k, 1))
    # canonical channels_last strides, the batch's too (a compiled graph guards on them)
    return out.permute(0, 3, 1, 2)


def native_winograd_f4(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, relu: bool = False,
                       residual: torch.Tensor | None = None, out_channels: int | None = None) -> torch.Tensor:
    """``winograd_conv3x3`` for F(4x4, 3x3) filters with the transforms in C (``_winograd_native.c``):
    each is one pass over memory, reading tiles straight from the map (no padded copy) and writing the
    output with its bias, ``residual`` (added before the ReLU, as a ResNet block does) and ReLU, edge
    tiles clipped.  Strips of tile rows as in ``winograd_conv3x3``; their buffers are reused.

    ``filters`` from ``winograd_filters`` take the batched product through ``torch.bmm``; packed by
    ``pack_filters`` (which needs ``NATIVE_PRODUCT``, and ``out_channels``: the packing pads them) they
    take it through the C kernel."""
    n, c, h, w = x.shape
    packed = filters.dim() == 4
    if packed and out_channels is None:
        raise ValueError("packed Winograd filters need out_channels")
    k = out_channels if packed else filters.shape[2]
    # the C code reads filters and residual through pointers: a mismatch would read past their end
    if packed and (tuple(filters.shape) != (36, -(-k // _PACKED_COLUMNS), c, _PACKED_COLUMNS)
                   or filters.dtype != torch.float32):
        raise ValueError(f"packed {filters.dtype} filters of shape {tuple(filters.shape)} do not fit "
                         f"{c} -> {k} float32 channels")
    if residual is not None and tuple(residual.shape) != (n, k, h, w):
        raise ValueError(f"a residual of shape {tuple(residual.shape)} does not fit an output of {(n, k, h, w)}")
    tiles_h, tiles_w = -(-h // 4), -(-w // 4)
    nhwc = _nhwc(x)
    out = torch.empty(n, h, w, k, dtype=x.dtype, device=x.device)
    if residual is not None:
        residual = _nhwc(residual)
        residual_ptr, residual_strides = residual.data_ptr(), residual.stride()[:3]
    else:
        residual_ptr, residual_strides = 0, (0, 0, 0)
    rows = max(1, _STRIP_VALUES // (36 * c * tiles_w * n))
    if filters.numel() * filters.element_size() > _CACHE_BYTES // 2:
        rows *= _LONG_STRIPS
    rows = min(tiles_h, rows)
    most = 36 * n * rows * tiles_w
    transformed_buffer, products_buffer = x.new_empty(most * c), x.new_empty(most * k)
    filters = filters.contiguous()
    bias = bias.contiguous() if bias is not None else None  # held: the C code reads it through a pointer
    bias_ptr = bias.data_ptr() if bias is not None else 0
    for r0 in range(0, tiles_h, rows):
        r1 = min(tiles_h, r0 + rows)
        count = n * (r1 - r0) * tiles_w
        transformed = transformed_buffer[: 36 * count * c].view(36, count, c)
        products = products_buffer[: 36 * count * k].view(36, count, k)
        _winograd_native.input_transform(nhwc.data_ptr(), (n, h, w, c), nhwc.stride()[:3], r0, r1, tiles_w,
                                         transformed.data_ptr())
        if packed:
            _winograd_native.batched_product(transformed.data_ptr(), (count, c), filters.data_ptr(), k,
                                             products.data_ptr())
        else:
            torch.bmm(transformed, filters, out=products)
        _winograd_native.output_transform(products.data_ptr(), (n, h, w, k), r0, r1, tiles_w, bias_ptr,
                                          residual_ptr, residual_strides, relu, out.data_ptr(), out.stride()[:3])
    return out.permute(0, 3, 1, 2)  # channels_last, as oneDNN's convolution returns it


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[N, H, W, C]`` with channels adjacent, as the C transforms read it (a view of a
    channels_last tensor, a copy of any other)."""
    nhwc = x.permute(0, 2, 3, 1)
    return nhwc if nhwc.stride(-1) == 1 else nhwc.contiguous()


def _zero_padded(nhwc: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``nhwc`` one pixel in from the top left of a zero ``[N, height, width, C]`` map.  Only the border is
    zeroed: ``F.pad`` zeroes the whole map before copying the inside over it, one more pass over memory."""
    n, h, w, c = nhwc.shape
    padded = nhwc.new_empty(n, height, width, c)
    padded[:, 1 : h + 1, 1 : w + 1] = nhwc
    padded[:, 0].zero_()
    padded[:, h + 1 :].zero_()
    padded[:, 1 : h + 1, 0].zero_()
    padded[:, 1 : h + 1, w + 1 :].zero_()
    return padded


class WinogradConv2d(FusedConv2d):
    """An ``nn.Conv2d`` (3x3, stride 1, padding 1) computed by ``winograd_conv3x3`` where that pays.

    Instances are made by ``use_winograd`` changing the class of an existing convolution; the direct
    kernel still runs for small maps, other dtypes or devices, under autocast, and for anything that
    needs gradients.  A ReLU (``relu``) and a residual that ``fuse_activations`` moved into it are
    applied as by a ``FusedConv2d``.
    """

    winograd_weight: torch.Tensor

    def attach_filters(self, tile: int) -> None:
        filters = winograd_filters(self.weight, tile)
        if _c_product(tile):
            filters = pack_filters(filters)  # only this copy is kept: it is all the C kernel reads
        self.register_buffer("winograd_weight", filters, persistent=False)

    @property
    def winograd_tile(self) -> int:
        return _tile_of(self.winograd_weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # Under autocast the direct kernel runs in the reduced precision autocast picks for convolutions;
        # Winograd's transforms would be cast to it too and lose far more.
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or x.dim() != 4 or torch.is_autocast_enabled("cpu")
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return super().forward(x, residual)
        relu = self.relu and residual is None  # with a residual the ReLU comes after the addition
        if torch.compiler.is_compiling():
            # One opaque call for maps of every size: a branch on the size would be a guard of the
            # compiled graph, and a recompile for each image whose smallest maps fall on its other side.
            y = torch.ops.vision.winograd_conv3x3(x, self.winograd_weight, self.bias, relu, self.out_channels)
        elif x.shape[-2] * x.shape[-1] < _MIN_PIXELS:
            return super().forward(x, residual)
        elif _native_tile(self.winograd_weight):
            return native_winograd_f4(x, self.winograd_weight, self.bias, self.relu, residual, self.out_channels)
        else:
            y = _winograd_op(x, self.winograd_weight, self.bias, relu, self.out_channels)
        return y if residual is None else self.finish(y, residual)


def _c_product(tile: int) -> bool:
    """Whether convolutions with this tile take the C batched product (their filters are packed for it)."""
    return tile == 4 and NATIVE_PRODUCT


def _native_tile(filters: torch.Tensor) -> bool:
    """Whether the C transforms compute with these filters: F(4x4, 3x3), where the extension was built."""
    return _winograd_native is not None and filters.shape[0] == 36


def _winograd_op(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, relu: bool,
                 out_channels: int) -> torch.Tensor:
    if _native_tile(filters):
        return native_winograd_f4(x, filters, bias, relu, out_channels=out_channels)
    return winograd_conv3x3(x, filters, bias, *_transforms(x.device, x.dtype, _tile_of(filters)), relu=relu)


# For torch.compile: the convolution as an operator of its own, which inductor calls as it is (the fake
# gives the output's shape and channels_last layout without computing it).
_compiled_op = torch.library.custom_op("vision::winograd_conv3x3", mutates_args=())(_winograd_op)


@_compiled_op.register_fake
def _(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, relu: bool,
      out_channels: int) -> torch.Tensor:
    n, _, h, w = x.shape
    return x.new_empty((n, out_channels, h, w)).contiguous(memory_format=torch.channels_last)


def _eligible(module: nn.Module, tile: int) -> bool:
    native = tile == 4 and _winograd_native is not None
    min_out_channels = _MIN_OUT_CHANNELS_NATIVE_PRODUCT if _c_product(tile) else _MIN_OUT_CHANNELS
    return (type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.stride == (1, 1)
            and module.padding == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros"
            and module.in_channels >= (_MIN_IN_CHANNELS_NATIVE if native else _MIN_IN_CHANNELS)
            and module.out_channels >= min_out_channels
            and module.weight.dtype == torch.float32)


def use_winograd(model: nn.Module, tile: int = 4) -> int:
    """Rewrite every eligible 3x3 convolution of ``model`` (not already rewritten) as a
    ``WinogradConv2d`` with output tiles of ``tile`` x ``tile`` (4 or 2); returns how many."""
    if tile not in _MATRICES:
        raise ValueError(f"Winograd tiles are {' or '.join(map(str, TILES))} pixels wide, not {tile}")
    rewritten = 0
    for module in model.modules():
        if _eligible(module, tile):
            module.__class__ = WinogradConv2d
            module.attach_filters(tile)
            rewritten += 1
    return rewritten
