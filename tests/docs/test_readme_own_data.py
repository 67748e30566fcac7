"""The README's "Train on your own data" section, run as written on a Roboflow-style COCO export.

The export has what real ones have: a placeholder category 0 with no annotations, classes from id 1,
polygons and RLE masks, a long-tailed class mix, one folder per split with ``_annotations.coco.json``.
Only the model is shrunk (command-line overrides, as the README allows) so the test runs in seconds.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from tests.helpers import PROJECT_ROOT
from vision.cli import main
from vision.data.synthetic import make_synthetic_dataset

README = (PROJECT_ROOT / "README.md").read_text()
SMALL = ["model.backbone=test_resnet", "model.fpn_channels=16", "model.min_size=[64]", "model.max_size=96",
         "model.anchor_sizes=[[8],[16],[32],[48],[64]]", "data.num_workers=0", "train.max_iters=3",
         "train.time_budget_min=null", "train.amp=false", "train.warmup_iters=1", "model.score_thresh=0.0"]


def _block(marker: str) -> str:
    m = re.search(re.escape(marker) + r"\n```\w*\n(.*?)```", README, re.S)
    assert m, f"README has no block after {marker}"
    return m.group(1)


def _roboflow_export(root: Path) -> None:
    raw = root / "raw"
    info = make_synthetic_dataset(raw, num_train=8, num_val=4, image_size=(96, 96), classes=3, max_objects=3,
                                  min_object_size=14, long_tail=8.0, seed=7)
    for split, folder in (("train", "train"), ("val", "valid")):
        data = json.loads(Path(info[split]).read_text())
        remap = {c["id"]: k + 1 for k, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
        data["categories"] = [{"id": 0, "name": "shapes", "supercategory": "none"}] + [
            {**c, "id": remap[c["id"]], "supercategory": "shapes"} for c in data["categories"]
        ]
        for a in data["annotations"]:
            a["category_id"] = remap[a["category_id"]]
        out = root / "export" / folder
        out.mkdir(parents=True)
        for im in data["images"]:
            shutil.copyfile(raw / "images" / im["file_name"], out / im["file_name"])
        (out / "_annotations.coco.json").write_text(json.dumps(data))


def test_the_readme_quickstart_on_a_coco_export(tmp_path, monkeypatch, capsys):
    _roboflow_export(tmp_path)
    export = tmp_path / "export"
    config = _block("<!-- own-data-config -->").replace("/data/my_export", str(export))
    assert len([ln for ln in config.splitlines() if ln.strip() and not ln.strip().startswith("#")]) <= 10
    (tmp_path / "my_data.yaml").write_text(config)
    (tmp_path / "configs").symlink_to(PROJECT_ROOT / "configs")  # the README's config sits beside configs/
    monkeypatch.chdir(tmp_path)
    for line in _block("<!-- own-data-commands -->").splitlines():
        words = shlex.split(line.split("#")[0].replace("/data/my_export", str(export)))
        assert words[0] == "vision"
        if words[1] == "train":
            words += SMALL
        assert main(words[1:]) == 0, line
    printed = capsys.readouterr().out
    images = json.loads((tmp_path / "preds" / "images.json").read_text())
    gt_categories = json.loads((export / "valid" / "_annotations.coco.json").read_text())["categories"]
    assert [(c["id"], c["name"]) for c in images["categories"]] == [(c["id"], c["name"]) for c in gt_categories]
    predicted_ids = {r["category_id"] for r in json.loads((tmp_path / "preds" / "predictions.json").read_text())}
    assert predicted_ids and predicted_ids <= {0, 1, 2, 3}
    evaluated = json.loads((tmp_path / "runs" / "my_data" / "metrics.json").read_text())["bbox"]["AP50"]
    scored = re.search(r"bbox AP [0-9.]+  AP50 ([0-9.]+)", printed)
    assert scored and float(scored.group(1)) == pytest.approx(evaluated, abs=0.002)
    assert (tmp_path / "runs" / "my_data" / "curves.png").is_file()
