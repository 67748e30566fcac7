"""3x3 convolutions by Winograd's minimal filtering, F(4x4, 3x3), for float32 inference on a CPU.

A detector spends most of its arithmetic in 3x3, stride-1 convolutions (RetinaNet's head towers are
about half of it).  oneDNN computes them directly, 9 multiply-adds per input channel per output, and on
a CPU it already runs near the machine's peak there, so only less arithmetic makes them faster.
Winograd's algorithm computes each 4x4 output tile from a 6x6 input tile with 36 products instead of
144, i.e. 2.25 instead of 9 multiply-adds per output and channel: the work becomes three small
matrix products around one large batched one (``torch.bmm``), which runs near peak as well.  Measured
on a 2-core CPU for 256 -> 256 channels at 100 x 156 (RetinaNet's P3), it takes 25 ms against oneDNN's
53 ms.

It is exact arithmetic reordered, so the result equals the convolution up to float32 rounding (the
transform matrices hold 1/4, 1/6, 1/12, 1/24 and powers of 2; errors are about 1e-5 of the output's
magnitude against about 1e-6 for the direct convolution).  PyTorch's convolution stays the reference
the tests compare with.  Only float32 on a CPU takes this path: cuDNN chooses Winograd kernels itself,
and reduced precision would lose too much in the transforms.

``use_winograd`` rewrites the eligible ``nn.Conv2d`` of a model in place (their class changes, their
parameters and state_dict do not); the transformed weights are computed once, in float64, so the
model is for inference: it must not be trained afterwards.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

# F(4x4, 3x3) (Lavin & Gray, 2016): Y = A^T [(G g G^T) * (B^T d B)] A for a 6x6 tile d and 3x3 filter g.
_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
TILE = 4  # output pixels per tile side
_MIN_PIXELS = 16 * 16  # below this the transforms' fixed cost outweighs the saving: the direct kernel runs
_MIN_IN_CHANNELS = 128  # narrower convolutions are memory-bound: fewer multiplications do not help them
_MIN_OUT_CHANNELS = 64  # (RetinaNet's 36-channel box regressor runs faster directly)
_STRIP_ELEMENTS = 96 * 256  # input tiles x channels per strip: about 3.5 MB once transformed


def winograd_filters(weight: torch.Tensor) -> torch.Tensor:
    """``[K, C, 3, 3]`` filters -> ``[36, C, K]``: G g G^T for every filter, in float64 then rounded once."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ij,kcjl,ml->imck", g, weight.detach().double(), g)  # [6, 6, C, K]
    return u.reshape(36, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


@lru_cache(maxsize=8)
def _transforms(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and output transforms as matrices on flattened tiles: vec(B^T d B) = (B^T (x) B^T) vec(d)."""
    bt = torch.tensor(_BT, dtype=torch.float64)
    at = torch.tensor(_AT, dtype=torch.float64)
    return (torch.kron(bt, bt).to(device, dtype), torch.kron(at, at).to(device, dtype))


def winograd_conv3x3(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None,
                     input_transform: torch.Tensor, output_transform: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for ``filters = winograd_filters(weight)``.

    ``x`` is ``[N, C, H, W]``, ideally ``channels_last``: tiles are cut from its NHWC view, and the
    result is ``[N, K, H, W]`` in ``channels_last`` memory, as oneDNN's convolution returns it.  A large
    map goes through in strips of tile rows, so that each strip's transformed tiles stay in cache
    between the three products (whole, a P3 map's are 2.25 times its 14 MB, and the batched product
    then runs at half speed).
    """
    n, c, h, w = x.shape
    k = filters.shape[2]
    tiles_h, tiles_w = -(-h // TILE), -(-w // TILE)
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, TILE * tiles_w + 1 - w, 1, TILE * tiles_h + 1 - h))
    out = torch.empty(n, TILE * tiles_h, TILE * tiles_w, k, dtype=x.dtype, device=x.device)
    rows = max(1, _STRIP_ELEMENTS // (c * tiles_w * n))
    for r0 in range(0, tiles_h, rows):
        r1 = min(tiles_h, r0 + rows)
        strip = padded[:, TILE * r0 : TILE * r1 + 2]
        tiles = strip.unfold(1, 6, TILE).unfold(2, 6, TILE)  # [N, rows, tw, C, 6, 6], overlapping views
        tiles = tiles.permute(4, 5, 0, 1, 2, 3).reshape(36, -1)  # [36, N*rows*tw*C]: one copy
        transformed = (input_transform @ tiles).view(36, -1, c)
        products = torch.bmm(transformed, filters)  # [36, tiles, K]: the bulk of the arithmetic
        result = (output_transform @ products.view(36, -1)).view(TILE, TILE, n, r1 - r0, tiles_w, k)
        target = out[:, TILE * r0 : TILE * r1]
        target.view(n, r1 - r0, TILE, tiles_w, TILE, k).copy_(result.permute(2, 3, 0, 4, 1, 5))
        if bias is not None:
            target.add_(bias)  # while the strip is in cache
    if out.shape[1] != h or out.shape[2] != w:
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (3x3, stride 1, padding 1) computed by ``winograd_conv3x3`` where that pays.

    Instances are made by ``use_winograd`` changing the class of an existing convolution; the direct
    kernel still runs for small maps, other dtypes or devices, and anything that needs gradients.
    """

    winograd_weight: torch.Tensor

    def attach_filters(self) -> None:
        self.register_buffer("winograd_weight", winograd_filters(self.weight), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or x.dim() != 4 or x.shape[-2] * x.shape[-1] < _MIN_PIXELS
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return super().forward(x)
        input_transform, output_transform = _transforms(x.device, x.dtype)
        return winograd_conv3x3(x, self.winograd_weight, self.bias, input_transform, output_transform)


def _eligible(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.stride == (1, 1)
            and module.padding == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros" and module.in_channels >= _MIN_IN_CHANNELS
            and module.out_channels >= _MIN_OUT_CHANNELS
            and module.weight.dtype == torch.float32)


def use_winograd(model: nn.Module) -> int:
    """Rewrite every eligible 3x3 convolution of ``model`` as a ``WinogradConv2d``; returns how many."""
    rewritten = 0
    for module in model.modules():
        if _eligible(module):
            module.__class__ = WinogradConv2d
            module.attach_filters()
            rewritten += 1
    return rewritten
