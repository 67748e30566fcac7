"""The one folder runner, for every task: resume, what an --out records, shards, torchrun, skipped files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import PROJECT_ROOT
from tests.helpers.images import write_random_images
from vision.cli import main


def _images(folder: Path, start: int, n: int) -> None:
    """``im{start:02d}.png`` onwards, each of its own height."""
    write_random_images(folder, [(40 + 2 * i, 56) for i in range(start, start + n)], seed=start, start=start,
                        pattern="im{:02d}.png")


def _entries(out: Path, arch: str) -> dict[str, dict]:
    """file name -> what the task's predictions.json says of it."""
    pred = json.loads((out / "predictions.json").read_text())
    if arch == "semantic_fpn":
        return {e["image"]["file_name"]: e for e in pred["images"]}
    if arch == "classifier":
        return {e["file_name"]: e for e in pred}
    names = {im["id"]: im["file_name"] for im in json.loads((out / "images.json").read_text())["images"]}
    by_name: dict[str, dict] = {n: {"results": []} for n in names.values()}
    for r in pred:
        by_name[names[r["image_id"]]]["results"].append(r)
    return by_name


def _predict(weights: Path, source: Path, out: Path, *more: str) -> int:
    return main(["predict", "--weights", str(weights), "--source", str(source), "--out", str(out), "--workers", "0",
                 *more])


@pytest.mark.parametrize("arch", ["retinanet", "semantic_fpn", "classifier"])
def test_every_task_resumes_and_keeps_what_was_done(tiny_checkpoint, tmp_path, capsys, arch):
    weights = tiny_checkpoint(arch)
    src, out = tmp_path / "imgs", tmp_path / "out"
    _images(src, 0, 4)
    assert _predict(weights, src, out) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("predicted 4 images (0 already done")
    before = _entries(out, arch)
    masks_before = {p.name: p.read_bytes() for p in (out / "masks").glob("*.png")} if arch == "semantic_fpn" else {}
    _images(src, 4, 4)
    assert _predict(weights, src, out) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("predicted 4 images (4 already done, 0 unreadable")
    after = _entries(out, arch)
    assert len(after) == 8 and all(after[n] == before[n] for n in before), "the first four are kept unchanged"
    for name, data in masks_before.items():
        assert (out / "masks" / name).read_bytes() == data
    assert json.loads((out / "skipped.json").read_text()) == []


def test_an_out_made_by_other_weights_settings_or_images_is_refused(tiny_checkpoint, tmp_path, capsys):
    first = tiny_checkpoint("retinanet", seed=0)
    other = tiny_checkpoint("retinanet", seed=1)
    src, out = tmp_path / "imgs", tmp_path / "out"
    _images(src, 0, 2)
    assert _predict(first, src, out) == 0
    kept = (out / "predictions.json").read_bytes()
    capsys.readouterr()
    for weights, more, what in [
        (other, [], "other weights"),
        (first, ["model.score_thresh=0.5"], "other settings"),
    ]:
        assert _predict(weights, src, out, *more) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and what in err and "--overwrite" in err
        assert (out / "predictions.json").read_bytes() == kept, "nothing written was lost"
    copy = tmp_path / "elsewhere"  # another folder with the same file names
    _images(copy, 10, 2)
    for i, p in enumerate(sorted(copy.iterdir())):
        p.rename(copy / f"im{i:02d}.png")
    assert _predict(first, copy, out) == 2
    assert "another source folder" in capsys.readouterr().err
    # --overwrite recomputes with the new weights
    assert _predict(other, src, out, "--overwrite") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("predicted 2 images (0 already done")
    assert (out / "predictions.json").read_bytes() != kept


def test_two_processes_sharing_an_out_keep_every_image(tiny_checkpoint, tmp_path):
    weights = tiny_checkpoint("retinanet")
    src, out = tmp_path / "imgs", tmp_path / "out"
    _images(src, 0, 10)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "vision", "predict", "--weights", str(weights), "--source", str(src), "--out",
           str(out), "--workers", "0"]
    procs = [subprocess.Popen([*cmd, "--shard", f"{k}/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for k in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    assert sorted(int(o[0].strip().splitlines()[-1].split()[1]) for o in outputs) == [5, 5]
    images = json.loads((out / "images.json").read_text())["images"]
    assert sorted(im["file_name"] for im in images) == [f"im{i:02d}.png" for i in range(10)]
    assert len({im["id"] for im in images}) == 10
    dets = json.loads((out / "predictions.json").read_text())
    assert {d["image_id"] for d in dets} == {im["id"] for im in images}
    # a third run finds everything done, and keeps the ids
    assert _predict(weights, src, out) == 0
    assert json.loads((out / "images.json").read_text())["images"] == images


@pytest.mark.parametrize("arch", ["semantic_fpn", "classifier"])
def test_torchrun_ranks_share_the_images_of_every_task(tiny_checkpoint, tmp_path, arch):
    weights = tiny_checkpoint(arch)
    src, out = tmp_path / "imgs", tmp_path / "out"
    _images(src, 0, 6)
    (src / "broken.png").write_text("not an image")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vision",
         "predict", "--weights", str(weights), "--source", str(src), "--out", str(out), "--workers", "0"],
        capture_output=True, text=True, env=env, timeout=300, cwd=PROJECT_ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("predicted 6 images (0 already done, 1 unreadable skipped)") == 1
    logged = [[json.loads(line) for line in (out / f"predictions.partial.rank{r}.jsonl").open()] for r in (0, 1)]
    done = [[e["image"]["file_name"] for e in rank if "skipped" not in e] for rank in logged]
    assert done[0] and done[1] and sorted(done[0] + done[1]) == [f"im{i:02d}.png" for i in range(6)]
    assert len(_entries(out, arch)) == 6
    assert [s["file_name"] for s in json.loads((out / "skipped.json").read_text())] == ["broken.png"]


def test_a_decompression_bomb_in_the_folder_is_skipped_and_every_other_image_predicted(tiny_checkpoint, tmp_path, capsys):
    """A 40000 x 40000 PNG of a few hundred bytes: refused from its header, listed, never decoded."""
    from tests.helpers.images import png_header

    weights = tiny_checkpoint("retinanet")
    src, out = tmp_path / "imgs", tmp_path / "out"
    _images(src, 0, 3)
    (src / "bomb.png").write_bytes(png_header(40000, 40000, color_type=2))
    assert _predict(weights, src, out) == 0
    text = capsys.readouterr().out
    assert text.strip().splitlines()[-1].startswith("predicted 3 images (0 already done, 1 unreadable skipped)")
    skipped = json.loads((out / "skipped.json").read_text())
    assert [s["file_name"] for s in skipped] == ["bomb.png"] and "pixels" in skipped[0]["error"]
    assert sorted(_entries(out, "retinanet")) == ["im00.png", "im01.png", "im02.png"]
