"""``vision predict`` refuses, in one line, the options the checkpoint's task would silently ignore."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from vision.cli import main


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
def test_flags_that_do_not_apply_are_refused(tiny_checkpoint, tmp_path, images, capsys, arch, flags, named):
    weights = tiny_checkpoint(arch)
    out = tmp_path / "out"
    rc = main(["predict", "--weights", str(weights), "--source", str(images), "--out", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert named in err and str(weights) in err
    assert not out.exists(), "refused before anything was written"


def test_flags_that_apply_are_taken(tiny_checkpoint, tmp_path, images, capsys):
    weights = tiny_checkpoint("semantic_fpn")
    assert main(["predict", "--weights", str(weights), "--source", str(images), "--out", str(tmp_path / "o"),
                 "--save-images", "--workers", "0"]) == 0
    assert (tmp_path / "o" / "images" / "x.png").exists()


def test_an_out_that_is_a_file_or_read_only_is_one_line(tiny_checkpoint, tmp_path, images, capsys):
    weights = tiny_checkpoint("semantic_fpn")
    blocker = tmp_path / "out_file"
    blocker.write_text("a file where the output folder should be")
    assert main(["predict", "--weights", str(weights), "--source", str(images), "--out", str(blocker),
                 "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "out_file" in err
    assert main(["predict", "--weights", str(weights), "--source", str(images), "--out", str(tmp_path / "o"),
                 "--batch-size", "0"]) == 2
    assert "--batch-size 0" in capsys.readouterr().err
