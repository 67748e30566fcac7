"""Test-wide settings: offline hubs (a missing weight file fails in a second) and a quiet albumentations."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real data sets beside the project; tests that need them skip where they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("shared data sets not present")
    return SHARED_DATA
