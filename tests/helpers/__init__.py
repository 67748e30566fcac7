"""What several test folders share: the project's paths, tiny checkpoints, small image folders, a recipe."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = PROJECT_ROOT / "configs"
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
