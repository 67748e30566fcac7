"""The start-up image check: the verdicts of a full read from a file's two ends, cached, once per job."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.helpers import PROJECT_ROOT
from tests.helpers.images import jpeg_declaring, png_header
from vision.data import image_check, image_io
from vision.data.image_check import CACHE_SUFFIX, cache_path_for, check_images
from vision.data.image_io import check_image_file, read_image_header
from vision.errors import ImageReadError


def _jpeg(size=(64, 48), app_bytes: int = 0, padding: bytes = b"") -> bytes:
    """A real JPEG; ``app_bytes`` of APP2 segments before the frame header push it past the first 64 KiB."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    segments = b""
    while app_bytes > 0:
        chunk = min(app_bytes, 65533)
        segments += b"\xff\xe2" + (chunk + 2).to_bytes(2, "big") + b"\x00" * chunk
        app_bytes -= chunk
    return data[:2] + segments + data[2:] + padding


def _files(folder: Path) -> dict[str, bytes | None]:
    ok, png = cv2.imencode(".png", np.full((40, 30, 3), 7, np.uint8))
    full = _jpeg()
    straddling = _jpeg(app_bytes=(1 << 16) - len(_jpeg()) + 1)  # the end marker's two bytes across 64 KiB
    return {
        "good.png": png.tobytes(),
        "good.jpg": full,
        "big_exif.jpg": _jpeg(app_bytes=200_000),  # frame header beyond the first 64 KiB: PIL's header read
        "padded.jpg": _jpeg(app_bytes=70_000, padding=b"\x00" * 9000),  # last 4 KiB all padding
        "straddling.jpg": straddling,
        "truncated.jpg": full[: len(full) // 2],
        "truncated.png": png.tobytes()[:60],
        "truncated_big.jpg": _jpeg(app_bytes=100_000)[:-300],
        "empty.png": b"",
        "noise.png": np.random.default_rng(1).integers(0, 255, 5000, dtype=np.uint8).tobytes(),
        "bomb.png": png_header(40000, 40000, color_type=2),
        "bomb.jpg": jpeg_declaring(30000, 30000),
        "no_pixels.png": png_header(0, 10),
        "missing.jpg": None,
    }


@pytest.fixture
def folder(tmp_path) -> Path:
    for name, data in _files(tmp_path).items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    return tmp_path


def _verdict(read, path: Path) -> str | None:
    try:
        read(path)
    except ImageReadError as e:
        return str(e)
    return None


def test_two_ends_give_the_verdicts_of_a_full_read(folder):
    """``read_image_header`` reads each file whole and opens it with PIL: the reference."""
    verdicts = {}
    for name in _files(folder):
        path = folder / name
        verdicts[name] = ours = _verdict(check_image_file, path)
        assert (ours is None) == (_verdict(read_image_header, path) is None), name
        if ours is not None:
            assert ours.startswith(str(path)), ours
    readable = {n for n, v in verdicts.items() if v is None}
    assert readable == {"good.png", "good.jpg", "big_exif.jpg", "padded.jpg", "straddling.jpg"}
    assert "truncated" in verdicts["truncated_big.jpg"] and "pixels" in verdicts["bomb.jpg"]
    assert (folder / "straddling.jpg").stat().st_size > 1 << 16


def test_the_cache_spares_unchanged_files_and_rechecks_changed_ones(folder, monkeypatch):
    calls: list[str] = []
    real = image_io.check_image_file
    monkeypatch.setattr(image_check, "check_image_file", lambda p: (calls.append(str(p)), real(p))[1])
    paths = [str(folder / n) for n in _files(folder)]
    cache = folder / ("train.json" + CACHE_SUFFIX)
    first = check_images(paths, cache)
    assert len(calls) == len(paths) and cache.is_file()
    assert set(first) == {p for p in paths if Path(p).name not in
                          {"good.png", "good.jpg", "big_exif.jpg", "padded.jpg", "straddling.jpg"}}
    calls.clear()
    assert check_images(paths, cache) == first
    assert calls == [str(folder / "missing.jpg")], "only the file that cannot be stat'ed is read again"
    # a file rewritten in place (new size and time) is checked again, and its new verdict kept
    good = folder / "good.jpg"
    good.write_bytes(good.read_bytes()[:100])
    calls.clear()
    again = check_images(paths, cache)
    assert str(good) in calls and "truncated" in again[str(good)]
    # a damaged cache is ignored, not trusted
    cache.write_text("{not json")
    calls.clear()
    assert check_images(paths, cache) == again and len(calls) == len(paths)


def test_the_cache_sits_beside_the_annotations_or_in_the_user_cache(tmp_path, monkeypatch):
    ann = tmp_path / "train.json"
    assert cache_path_for(ann) == tmp_path / ("train.json" + CACHE_SUFFIX)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o555)  # a data set made read-only: left alone, even by root
    try:
        elsewhere = cache_path_for(data / "train.json")
    finally:
        data.chmod(0o755)
    assert elsewhere.parent == tmp_path / "xdg" / "vision" / "image-checks"
    monkeypatch.setattr(image_check.os, "access", lambda path, mode: False)  # no write permission for us
    assert cache_path_for(data / "train.json") == elsewhere
    assert elsewhere != cache_path_for(data / "val.json")


def test_a_training_set_skips_the_bad_files_and_caches_the_check(tmp_path):
    from vision.data.build import drop_unreadable_images
    from vision.data.coco import read_coco
    from vision.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path, num_train=6, num_val=2, image_size=(64, 64), classes=2, seed=0)
    ann = json.loads((tmp_path / "train.json").read_text())
    victim = tmp_path / "images" / ann["images"][0]["file_name"]
    victim.write_bytes(b"")
    det_set = drop_unreadable_images(read_coco(tmp_path / "train.json", tmp_path / "images"))
    assert len(det_set) == 5 and len(det_set.skipped_images) == 1 and "empty file" in det_set.skipped_images[0]
    cached = json.loads((tmp_path / ("train.json" + CACHE_SUFFIX)).read_text())["files"]
    assert len(cached) == 6 and cached[str(victim)][2] == det_set.skipped_images[0]


RANKS = r"""
import json, sys
from vision.runtime.distributed import init_distributed, dist_info, cleanup
import torch
init_distributed(torch.device("cpu"))
from vision.data import image_check
real, calls = image_check.check_image_file, []
image_check.check_image_file = lambda p: (calls.append(p), real(p))[1]
paths = json.loads(sys.argv[1])
errors = image_check.check_images_once_per_job(paths, sys.argv[2])
print(json.dumps({"rank": dist_info().rank, "reads": len(calls), "errors": sorted(errors)}))
cleanup()
"""


def test_under_torchrun_rank_zero_checks_and_the_others_read_its_cache(folder, tmp_path):
    paths = [str(folder / n) for n in _files(folder) if n != "missing.jpg"]
    (folder / "train.json").write_text("{}")  # the annotations the cache goes beside
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         json.dumps(paths), str(folder / "train.json")],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    assert [r["reads"] for r in ranks] == [len(paths), 0]
    assert ranks[0]["errors"] == ranks[1]["errors"] and len(ranks[0]["errors"]) == 8
