"""``vision predict`` refuses, in one line, the options the checkpoint's task would silently ignore."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vision.cli import main
from vision.config import config_to_dict, load_config
from vision.engine.checkpoint import atomic_save
from vision.models import build_model


def _checkpoint(tmp_path, arch: str):
    cfg = load_config(None, [f"model.arch={arch}", "model.backbone=test_resnet", "model.num_classes=2",
                             "model.fpn_channels=16", "model.min_size=[64]", "model.max_size=64"])
    path = tmp_path / f"{arch}.pt"
    atomic_save({"model": build_model(cfg.model).state_dict(), "config": config_to_dict(cfg), "arch": arch,
                 "class_names": ["a", "b"], "categories": {"ids": [1, 2], "names": ["a", "b"]}}, path)
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "x.png"), np.full((64, 64, 3), 90, np.uint8))
    return folder


@pytest.mark.parametrize(
    ("arch", "flags", "named"),
    [
        ("classifier", ["--tta"], "--tta"),
        ("classifier", ["--save-images"], "--save-images"),
        ("classifier", ["--hierarchy", "h.json"], "--hierarchy"),
        ("classifier", ["--fusion", "nms", "--iou", "0.6"], "--fusion, --iou"),
        ("semantic_fpn", ["--tta"], "--tta"),
        ("semantic_fpn", ["--csv"], "--csv"),
        ("semantic_fpn", ["--hierarchy", "h.json"], "--hierarchy"),
    ],
)
def test_flags_that_do_not_apply_are_refused(tmp_path, images, capsys, arch, flags, named):
    weights = _checkpoint(tmp_path, arch)
    out = tmp_path / "out"
    rc = main(["predict", "--weights", str(weights), "--source", str(images), "--out", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert named in err and str(weights) in err
    assert not out.exists(), "refused before anything was written"


def test_flags_that_apply_are_taken(tmp_path, images, capsys):
    weights = _checkpoint(tmp_path, "semantic_fpn")
    assert main(["predict", "--weights", str(weights), "--source", str(images), "--out", str(tmp_path / "o"),
                 "--save-images", "--workers", "0"]) == 0
    assert (tmp_path / "o" / "images" / "x.png").exists()


def test_an_out_that_is_a_file_or_read_only_is_one_line(tmp_path, images, capsys):
    weights = _checkpoint(tmp_path, "semantic_fpn")
    blocker = tmp_path / "out_file"
    blocker.write_text("a file where the output folder should be")
    assert main(["predict", "--weights", str(weights), "--source", str(images), "--out", str(blocker),
                 "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "out_file" in err
    assert main(["predict", "--weights", str(weights), "--source", str(images), "--out", str(tmp_path / "o"),
                 "--batch-size", "0"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err
