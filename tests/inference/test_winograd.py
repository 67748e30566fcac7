"""Winograd 3x3 convolutions against PyTorch's own convolution, layer by layer and in a whole detector."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vision.config import ModelConfig
from vision.inference import winograd
from vision.inference.engine import EngineOptions, optimize_for_inference
from vision.inference.winograd import (
    WinogradConv2d,
    _transforms,
    native_winograd_f4,
    pack_filters,
    use_winograd,
    winograd_conv3x3,
    winograd_filters,
)
from vision.models import build_model


@pytest.mark.parametrize(
    ("n", "c", "k", "h", "w", "bias", "channels_last"),
    [
        (1, 128, 64, 32, 40, True, True),  # a whole number of tiles
        (1, 128, 64, 30, 40, True, True),  # partial tile rows only
        (2, 96, 80, 23, 37, True, True),  # partial tiles on both sides, a batch
        (1, 64, 128, 130, 19, False, False),  # many strips, no bias, an NCHW input
        (1, 256, 819, 24, 32, True, True),  # RetinaNet's classifier shape
    ],
)
@pytest.mark.parametrize("tile", [4, 2])
def test_winograd_equals_pytorchs_convolution(n: int, c: int, k: int, h: int, w: int, bias: bool,
                                              channels_last: bool, tile: int) -> None:
    g = torch.Generator().manual_seed(h * w)
    x = torch.randn(n, c, h, w, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 3, 3, generator=g) / (3 * c**0.5)
    b = torch.randn(k, generator=g) if bias else None
    ref = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
    direct = F.conv2d(x, weight, b, padding=1)
    got = winograd_conv3x3(x, winograd_filters(weight, tile), b, *_transforms(x.device, x.dtype, tile))
    assert got.shape == ref.shape and got.dtype == torch.float32
    # channels_last with canonical strides, the batch's included: a compiled graph guards on them
    assert got.stride() == torch.empty_like(ref, memory_format=torch.channels_last).stride()
    scale = ref.abs().max().item()
    error, direct_error = (got.double() - ref).abs().max().item(), (direct.double() - ref).abs().max().item()
    if tile == 4:  # float32 rounding only: within a few times the direct kernel's own error, far below 1e-3
        assert error < max(20 * direct_error, 1e-5 * scale)
    else:  # transforms of 0, 1 and 1/2 only: rounding no larger than the direct kernel's
        assert error < 1.5 * direct_error


def test_the_native_transforms_are_built() -> None:
    # optional at install (a machine without a C compiler computes the transforms with tensor operations),
    # but a build that silently failed here would leave the native path untested
    assert winograd._winograd_native is not None


@pytest.mark.parametrize(
    ("n", "c", "k", "h", "w", "strip_values"),
    [
        (1, 64, 64, 32, 40, None),  # a whole number of tiles, 64 channels (ResNet's first stage)
        (1, 128, 80, 30, 41, None),  # partial tiles on both sides, channels not a multiple of 64
        (2, 96, 200, 23, 37, None),  # a batch
        (1, 256, 256, 61, 45, 36 * 256 * 12 * 4),  # strips of 4 tile rows, the last one shorter
        (1, 72, 136, 130, 19, 36 * 72 * 5),  # one tile row per strip
    ],
)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("product", ["bmm", "native"])
def test_native_transforms_equal_pytorchs_convolution_with_bias_residual_and_relu(
        monkeypatch, n, c, k, h, w, strip_values, residual, relu, bias, product) -> None:
    if product == "native" and not winograd.NATIVE_PRODUCT:
        pytest.skip("the C batched product needs AVX-512")
    if strip_values is not None:
        monkeypatch.setattr(winograd, "_STRIP_VALUES", strip_values)
    g = torch.Generator().manual_seed(h * w + c)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 3, 3, generator=g) / (3 * c**0.5)
    b = torch.randn(k, generator=g) if bias else None
    r = torch.randn(n, k, h, w, generator=g).contiguous(memory_format=torch.channels_last) if residual else None
    ref = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
    direct = F.conv2d(x, weight, b, padding=1)
    if residual:
        ref, direct = ref + r.double(), direct + r
    if relu:
        ref, direct = ref.relu(), direct.relu()
    filters = winograd_filters(weight, 4)
    if product == "native":
        got = native_winograd_f4(x, pack_filters(filters), b, relu, r, out_channels=k)
    else:
        got = native_winograd_f4(x, filters, b, relu, r)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert got.stride() == torch.empty_like(ref, memory_format=torch.channels_last).stride()
    error, direct_error = (got.double() - ref).abs().max().item(), (direct.double() - ref).abs().max().item()
    assert error < max(20 * direct_error, 1e-5 * ref.abs().max().item())
    tensor_ops = winograd_conv3x3(x, winograd_filters(weight, 4), b, *_transforms(x.device, x.dtype, 4))
    if not residual and not relu:  # the same arithmetic in another order
        assert (got - tensor_ops).abs().max().item() < max(20 * direct_error, 1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("packed", [False, True])
def test_filters_larger_than_the_cache_go_through_in_longer_strips(monkeypatch, packed: bool) -> None:
    if packed and not winograd.NATIVE_PRODUCT:
        pytest.skip("the C batched product needs AVX-512")
    monkeypatch.setattr(winograd, "_CACHE_BYTES", 0)  # every filter bank counts as larger than the cache
    monkeypatch.setattr(winograd, "_STRIP_VALUES", 36 * 64 * 6)  # one tile row per strip before, 4 now
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, 37, 21, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(70, 64, 3, 3, generator=g) / 24
    filters = winograd_filters(weight, 4)
    got = (native_winograd_f4(x, pack_filters(filters), None, out_channels=70) if packed
           else native_winograd_f4(x, filters, None))
    torch.testing.assert_close(got, F.conv2d(x, weight, padding=1), rtol=1e-4, atol=1e-4)


def test_the_last_level_cache_size_is_read_or_assumed() -> None:
    assert winograd._CACHE_BYTES >= 2**20


def test_native_transforms_read_an_nchw_input_and_residual() -> None:
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(1, 64, 20, 22, generator=g), torch.randn(1, 96, 20, 22, generator=g)
    weight = torch.randn(96, 64, 3, 3, generator=g) / 24
    got = native_winograd_f4(x, winograd_filters(weight, 4), None, True, r)
    torch.testing.assert_close(got, (F.conv2d(x, weight, padding=1) + r).relu(), rtol=1e-4, atol=1e-4)


def test_the_native_product_runs_wherever_the_cpu_has_avx512() -> None:
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert winograd.NATIVE_PRODUCT  # not silently left to torch.bmm


def test_packed_filters_hold_the_filters_block_by_block_with_zeros_past_the_last_channel() -> None:
    filters = torch.randn(36, 5, 70)
    packed = pack_filters(filters)
    assert packed.shape == (36, 3, 5, 32)
    unpacked = packed.permute(0, 2, 1, 3).reshape(36, 5, 96)
    assert torch.equal(unpacked[:, :, :70], filters) and not unpacked[:, :, 70:].any()


def test_packed_filters_that_do_not_fit_the_convolution_are_refused() -> None:
    x = torch.randn(1, 64, 8, 8)
    packed = pack_filters(winograd_filters(torch.randn(70, 64, 3, 3), 4))
    with pytest.raises(ValueError, match="out_channels"):
        native_winograd_f4(x, packed, None)
    with pytest.raises(ValueError, match="do not fit 64 -> 100 float32 channels"):
        native_winograd_f4(x, packed, None, out_channels=100)
    with pytest.raises(ValueError, match="do not fit 32 -> 70 float32 channels"):
        native_winograd_f4(x[:, :32], packed, None, out_channels=70)
    with pytest.raises(ValueError, match=r"torch\.float64 filters"):
        native_winograd_f4(x, packed.double(), None, out_channels=70)
    with pytest.raises(ValueError, match="residual of shape"):
        native_winograd_f4(x, packed, None, residual=torch.randn(1, 70, 4, 8), out_channels=70)


@pytest.mark.skipif(not winograd.NATIVE_PRODUCT, reason="the C batched product needs AVX-512")
@pytest.mark.parametrize(("count", "c", "k"), [
    (1, 1, 1), (12, 64, 32), (13, 64, 33), (68, 256, 256), (7, 256, 819), (50, 100, 36), (25, 3, 17),
    (300, 128, 48),
])
def test_the_native_batched_product_equals_torch_bmm(count: int, c: int, k: int) -> None:
    g = torch.Generator().manual_seed(count * c + k)
    a, b = torch.randn(36, count, c, generator=g), torch.randn(36, c, k, generator=g)
    packed, out = pack_filters(b), torch.full((36, count, k), float("nan"))  # every value must be written
    winograd._winograd_native.batched_product(a.data_ptr(), (count, c), packed.data_ptr(), k, out.data_ptr())
    reference = torch.bmm(a, b)
    # the same sums in another order: float32 rounding of the sum of |a| |b|, nothing more
    bound = 4 * c * torch.finfo(torch.float32).eps * torch.bmm(a.abs(), b.abs())
    assert not out.isnan().any() and ((out - reference).abs() <= bound).all()


def winograd_layers(model: nn.Module, tile: int) -> list[nn.Module]:
    use_winograd(model, tile=tile)
    return [m for m in model.modules() if isinstance(m, WinogradConv2d)]


def _retinanet() -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="retinanet", backbone="resnet18", num_classes=3, fpn_channels=128, min_size=[256],
                      max_size=320, score_thresh=0.05)
    model = build_model(cfg).eval()
    with torch.no_grad():  # scores spread out, so that the comparison covers real detections
        for conv in model.head.classification_head.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight)
        model.head.classification_head.cls_logits.bias.zero_()
    return model


def test_use_winograd_rewrites_only_the_eligible_convolutions_and_keeps_the_state_dict() -> None:
    model = _retinanet()
    before = model.state_dict()
    rewritten = use_winograd(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    fast = [m for m in convs if isinstance(m, WinogradConv2d)]
    assert rewritten == len(fast) > 8  # the two head towers at least
    for conv in fast:
        assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.in_channels >= 64
    # the C transforms pay from 64 input channels (ResNet-18's first stage here), tensor operations from 128
    assert any(conv.in_channels == 64 for conv in fast)
    assert all(conv.in_channels >= 128 for conv in winograd_layers(_retinanet(), tile=2))
    # strided and 1x1 convolutions stay direct; the 36-channel box regressor too, unless the C product runs
    # its product (with torch.bmm's it is faster directly)
    bbox_reg = model.head.regression_head.bbox_reg
    assert bbox_reg.__class__ is (WinogradConv2d if winograd.NATIVE_PRODUCT else nn.Conv2d)
    assert all(conv.out_channels >= 64 for conv in winograd_layers(_retinanet(), tile=2))
    assert any(m.stride == (2, 2) and type(m) is nn.Conv2d for m in convs)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("tile", [4, 2])
def test_the_engine_computes_every_wide_3x3_convolution_with_the_tile_asked_for(tile: int) -> None:
    options = EngineOptions() if tile == 4 else EngineOptions(winograd_tile=tile)  # F(4x4, 3x3) by default
    model = optimize_for_inference(_retinanet(), options, copy_model=False)
    tiles = {name: m.winograd_tile for name, m in model.named_modules() if isinstance(m, WinogradConv2d)}
    for part in ("backbone.", "head.classification_head.", "head.regression_head."):
        assert any(name.startswith(part) for name in tiles), part
    assert set(tiles.values()) == {tile}


def test_other_tile_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="4 or 2"):
        use_winograd(nn.Conv2d(128, 128, 3, padding=1), tile=6)


def test_a_detector_with_winograd_convolutions_gives_the_plain_models_detections() -> None:
    model = _retinanet()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 250, 310, generator=g), torch.rand(3, 300, 240, generator=g)]
    with torch.inference_mode():
        ref = model(images)
        fast = optimize_for_inference(copy.deepcopy(model), EngineOptions())
        assert any(isinstance(m, WinogradConv2d) for m in fast.modules())
        got = fast(images)
    for r, o in zip(ref, got):
        assert len(r["scores"]) > 20, "the comparison needs detections"
        top = min(20, len(r["scores"]))
        torch.testing.assert_close(o["scores"][:top], r["scores"][:top], atol=1e-3, rtol=0)
        torch.testing.assert_close(o["boxes"][:top], r["boxes"][:top], atol=1e-2, rtol=0)
        assert torch.equal(o["labels"][:top], r["labels"][:top])


def test_winograd_is_off_where_it_does_not_belong() -> None:
    for options in (EngineOptions.plain(), EngineOptions(precision="bf16"), EngineOptions(winograd=False)):
        model = optimize_for_inference(_retinanet(), options, copy_model=False)
        assert not any(isinstance(m, WinogradConv2d) for m in model.modules()), options


def test_gradients_and_small_maps_take_the_direct_kernel() -> None:
    conv = nn.Conv2d(128, 128, 3, padding=1)
    reference = copy.deepcopy(conv)
    use_winograd(conv)
    assert isinstance(conv, WinogradConv2d)
    x = torch.randn(1, 128, 40, 40, requires_grad=True)
    conv(x).sum().backward()  # autograd through the direct kernel, as before
    reference(x).sum().backward()
    assert torch.equal(conv.weight.grad, reference.weight.grad)
    small = torch.randn(1, 128, 8, 8)
    with torch.no_grad():
        assert torch.equal(conv(small), reference(small))
    # under autocast (evaluation during mixed-precision training) the convolution is autocast's
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, exp = conv(x), reference(x)
    assert got.dtype == exp.dtype == torch.bfloat16 and torch.equal(got, exp)
