"""On a CPU, images whose model inputs are the same size share a forward pass; no other images do."""

from __future__ import annotations

import random

import pytest
import torch

from vision.config import ModelConfig
from vision.data.records import Categories
from vision.inference.engine import EngineOptions, input_size, same_input_groups
from vision.inference.predictor import Predictor
from vision.inference.runner import by_image_size
from vision.models import build_model


def _detector(min_size: int = 256, max_size: int = 320) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="retinanet", backbone="resnet18", num_classes=3, fpn_channels=64, min_size=[min_size],
                      max_size=max_size, score_thresh=0.05)
    model = build_model(cfg).eval()
    with torch.no_grad():  # scores spread out, so that comparisons cover real detections
        for conv in model.head.classification_head.modules():
            if isinstance(conv, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(conv.weight)
        model.head.classification_head.cls_logits.bias.zero_()
    return model


@pytest.mark.parametrize(("min_size", "max_size"), [(256, 320), (800, 1333)])
def test_input_size_is_the_batch_tensor_torchvisions_transform_makes(min_size: int, max_size: int) -> None:
    model = _detector(min_size, max_size)
    rng = random.Random(min_size)
    sizes = [(rng.randint(20, 1400), rng.randint(20, 1400)) for _ in range(200)] + [(480, 640), (427, 640), (1, 3)]
    for h, w in sizes:
        batch, _ = model.transform([torch.zeros(3, h, w)])
        assert input_size(model, h, w) == tuple(batch.tensors.shape[-2:]), (h, w)


def test_groups_hold_only_images_of_one_input_size() -> None:
    model = _detector()
    images = [torch.zeros(3, h, w, dtype=torch.uint8)
              for h, w in [(240, 320), (300, 400), (200, 300), (240, 320), (480, 640), (240, 321), (240, 320)]]
    groups = same_input_groups(model, images, 2)
    assert sorted(i for g in groups for i in g) == list(range(len(images)))
    for g in groups:
        assert len(g) <= 2 and len({input_size(model, *images[i].shape[-2:]) for i in g}) == 1
    # (240, 320), (300, 400) and (480, 640) resize alike, as does (240, 321) after padding to 32
    assert len(groups) == 4
    assert same_input_groups(torch.nn.Linear(2, 2), images, 4) == [[i] for i in range(len(images))]


def test_a_cpu_pass_takes_equal_inputs_together_and_gives_each_images_own_detections() -> None:
    model = _detector()
    g = torch.Generator().manual_seed(3)
    images = [(torch.rand(3, h, w, generator=g) * 255).to(torch.uint8)
              for h, w in [(240, 320), (200, 300), (300, 400), (480, 640), (150, 330)]]
    categories = Categories(ids=[1, 2, 3], names=["a", "b", "c"])
    grouped = Predictor(model, categories, device="cpu")
    single = Predictor(model, categories, device="cpu", engine=EngineOptions(micro_batch=1))
    assert grouped.groups_equal_inputs and not single.groups_equal_inputs
    passes: list[int] = []
    grouped.model.backbone.register_forward_hook(lambda m, args, out: passes.append(args[0].shape[0]))
    got, expected = grouped.predict(images), single.predict(images)
    assert sorted(passes) == [1, 1, 3]  # 240x320, 300x400 and 480x640 all become one 256x320 input
    for o, e in zip(got, expected, strict=True):
        assert len(e["scores"]) > 5, "the comparison needs detections"
        torch.testing.assert_close(o["scores"], e["scores"], atol=1e-5, rtol=0)
        torch.testing.assert_close(o["boxes"], e["boxes"], atol=1e-3, rtol=0)
        assert torch.equal(o["labels"], e["labels"])


def test_the_folder_runner_takes_images_in_order_of_size(tmp_path) -> None:
    from PIL import Image

    paths = []
    for name, (w, h) in zip("abcde", [(64, 48), (32, 32), (64, 48), (40, 30), (32, 32)]):
        Image.new("RGB", (w, h)).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths.append(str(tmp_path / "broken.png"))
    order = by_image_size(list(range(len(paths))), paths)
    assert [paths[i].rsplit("/", 1)[1] for i in order] == ["broken.png", "b.png", "e.png", "d.png", "a.png", "c.png"]
