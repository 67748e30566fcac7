"""Test-wide settings (offline hubs, a quiet albumentations) and the fixtures every test folder shares."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    """The real data sets beside the project; tests that need them skip where they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("shared data sets not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_checkpoint(arch, filename=None, **options)``: the path of a tiny checkpoint with
    ``write_checkpoint``'s options, named ``filename`` where a test's messages name the file.

    Each distinct checkpoint is written once per session and shared, so tests must not change the file.
    """
    from tests.helpers.checkpoints import write_checkpoint

    folder = tmp_path_factory.mktemp("checkpoints")
    written: dict[str, Path] = {}

    def make(arch: str = "retinanet", filename: str | None = None, **options) -> Path:
        key = repr((arch, filename, sorted(options.items())))
        if key not in written:
            path = folder / str(len(written)) / (filename or f"{arch}.pt")
            written[key] = write_checkpoint(path, arch, **options)
        return written[key]

    return make
