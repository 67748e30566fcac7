"""Ahead-of-time compiled parts (``vision.inference.aot``): one package for every size, kept on disk, and
the part itself for whatever the package was not made for."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from vision.inference import aot


class _Maps(nn.Module):
    """Two maps in, a dict of two maps out: a feature pyramid's shape."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.conv(x).relu()
        return {"0": y, "1": self.down(y)}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VISION_COMPILE_CACHE", str(tmp_path / "compiled"))
    return tmp_path / "compiled"


def _count_compiles(monkeypatch) -> list[str]:
    calls = []
    compile_part = aot.CompiledPart._compile
    monkeypatch.setattr(aot.CompiledPart, "_compile",
                        lambda self, *a: (calls.append(type(self.part).__name__), compile_part(self, *a)))
    return calls


def test_one_package_serves_every_size_and_other_inputs_run_the_part_itself(cache, monkeypatch) -> None:
    calls = _count_compiles(monkeypatch)
    part = _Maps().eval()
    compiled = aot.CompiledPart(part, image_multiple=32)
    with torch.inference_mode():
        for h, w in ((40, 64), (64, 96), (32, 128), (160, 64), (64, 8200)):  # the first and last: not served
            x = torch.randn(1, 3, h, w)
            got, want = compiled(x), part(x)
            assert got.keys() == want.keys()
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
        assert calls == ["_Maps"] and len(list(cache.glob("*.pt2"))) == 1
        # a new part with the same weights (a later process) loads the package
        again = aot.CompiledPart(_Maps().eval(), image_multiple=32)
        again(torch.randn(1, 3, 96, 96))
        assert calls == ["_Maps"]
        # other weights are another package
        other = _Maps().eval()
        with torch.no_grad():
            other.conv.bias.add_(1)
        aot.CompiledPart(other, image_multiple=32)(torch.randn(1, 3, 64, 64))
        assert len(calls) == 2 and len(list(cache.glob("*.pt2"))) == 2
        assert not list(cache.glob(".*.pt2"))  # no partial packages left behind


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if float(x.sum()) > 0 else x  # a branch on a value: torch.export refuses it


def test_a_part_that_cannot_be_exported_is_compiled_by_torch_compile(cache, monkeypatch, caplog) -> None:
    compiled_by_dynamo = []
    monkeypatch.setattr(aot.torch, "compile",
                        lambda module, dynamic: compiled_by_dynamo.append(dynamic) or module)
    part = aot.CompiledPart(_DataDependent())
    x = torch.ones(1, 3, 8, 8)
    with caplog.at_level(logging.WARNING, logger="vision.inference.aot"):
        torch.testing.assert_close(part(x), 2 * x)
    assert compiled_by_dynamo == [True] and "using torch.compile" in caplog.text
    torch.testing.assert_close(part(-x), -x)


def test_a_damaged_package_is_removed_and_the_part_runs_as_it_is(cache, monkeypatch, caplog) -> None:
    part = aot.CompiledPart(_Maps().eval(), image_multiple=32)
    x = torch.randn(1, 3, 64, 64)
    layout = (str(torch.utils._pytree.tree_flatten((x,))[1]), ((x.dtype, "cpu", 1, 3, False),),
              (False, torch.get_autocast_dtype("cpu")))
    path = cache / f"{part._key(layout, 32)}.pt2"
    cache.mkdir(parents=True)
    path.write_bytes(b"not a package")
    with caplog.at_level(logging.WARNING, logger="vision.inference.aot"), torch.inference_mode():
        got = part(x)
    torch.testing.assert_close(got["1"], part.part(x)["1"])
    assert "could not load" in caplog.text and not path.exists()
