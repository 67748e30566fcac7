"""``vision convert`` end to end, and one-line errors (never a traceback) for bad input."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from vision.cli import main


def _voc_folder(root: Path, n=3):
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for i in range(n):
        objects = "".join(
            f"<object><name>{'ab'[k % 2]}</name><bndbox><xmin>{5 + 10 * k}</xmin><ymin>5</ymin>"
            f"<xmax>{12 + 10 * k}</xmax><ymax>20</ymax></bndbox></object>"
            for k in range(i + 1)
        )
        (root / "Annotations" / f"im{i}.xml").write_text(
            f"<annotation><filename>im{i}.jpg</filename><size><width>64</width><height>32</height></size>{objects}</annotation>"
        )
        Image.new("RGB", (64, 32)).save(root / "JPEGImages" / f"im{i}.jpg")


def test_voc_to_coco_keeps_every_box(tmp_path, capsys):
    _voc_folder(tmp_path)
    out = tmp_path / "out.json"
    assert main(["convert", "--from", "voc", "--labels", str(tmp_path / "Annotations"),
                 "--images", str(tmp_path / "JPEGImages"), "--out", str(out)]) == 0
    coco = json.loads(out.read_text())
    counts = {img["file_name"]: 0 for img in coco["images"]}
    names = {img["id"]: img["file_name"] for img in coco["images"]}
    for a in coco["annotations"]:
        counts[names[a["image_id"]]] += 1
    assert counts == {"im0.jpg": 1, "im1.jpg": 2, "im2.jpg": 3}
    first = next(a for a in coco["annotations"] if names[a["image_id"]] == "im0.jpg")
    assert first["bbox"] == [4.0, 4.0, 8.0, 16.0]  # 1-based inclusive (5..12, 5..20) -> x 4, w 8
    assert "wrote" in capsys.readouterr().out


def test_bccd_and_raccoon_convert_with_every_box(shared_data, tmp_path):
    for name, ann, images in [("bccd", "Annotations", "JPEGImages"), ("raccoon", "annotations", "images")]:
        root = shared_data / name
        out = tmp_path / f"{name}.json"
        assert main(["convert", "--from", "voc", "--labels", str(root / ann), "--images", str(root / images),
                     "--out", str(out)]) == 0
        coco = json.loads(out.read_text())
        per_image = {}
        for a in coco["annotations"]:
            per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
        dropped = 0
        for img in coco["images"]:
            objects = ET.parse(root / ann / (Path(img["file_name"]).stem + ".xml")).getroot().findall("object")
            degenerate = sum(
                float(o.find("bndbox/xmax").text) <= float(o.find("bndbox/xmin").text)
                or float(o.find("bndbox/ymax").text) <= float(o.find("bndbox/ymin").text)
                for o in objects
            )
            dropped += degenerate
            assert per_image.get(img["id"], 0) == len(objects) - degenerate, img["file_name"]
        assert dropped == (2 if name == "bccd" else 0)


def test_bccd_self_evaluation_matches_pycocotools(shared_data, tmp_path):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root = shared_data / "bccd"
    gt_path = tmp_path / "bccd.json"
    main(["convert", "--from", "voc", "--labels", str(root / "Annotations"), "--images", str(root / "JPEGImages"),
          "--out", str(gt_path)])
    gt = json.loads(gt_path.read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    assert main(["eval-dets", "--gt", str(gt_path), "--dets", str(tmp_path / "dets.json"),
                 "--out", str(tmp_path / "m.json")]) == 0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        ev = COCOeval(coco, coco.loadRes(str(tmp_path / "dets.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    got = list(json.loads((tmp_path / "m.json").read_text())["bbox"].values())
    assert got == pytest.approx(list(ev.stats), abs=1e-12)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", ["json_syntax", "unknown_image", "unknown_category", "voc_no_size", "yolo_four"])
def test_bad_input_gives_exit_2_and_one_line_naming_the_file(tmp_path, capsys, case):
    img = {"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}
    cats = [{"id": 1, "name": "x"}]
    if case == "json_syntax":
        bad = _write(tmp_path / "a.json", '{"images": [}')
        argv = ["convert", "--from", "coco", "--labels", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "o.json")]
        expect = "invalid JSON at line 1"
    elif case == "unknown_image":
        bad = _write(tmp_path / "a.json", json.dumps({"images": [img], "categories": cats, "annotations": [
            {"id": 5, "image_id": 2, "category_id": 1, "bbox": [0, 0, 1, 1]}]}))
        argv = ["convert", "--from", "coco", "--labels", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "o.json")]
        expect = "annotation 5: image_id 2 is not in 'images'"
    elif case == "unknown_category":
        bad = _write(tmp_path / "a.json", json.dumps({"images": [img], "categories": cats, "annotations": [
            {"id": 5, "image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1]}]}))
        argv = ["eval-dets", "--gt", str(bad), "--dets", str(bad)]
        expect = "annotation 5 (image 'a.jpg'): category_id 4 is not in 'categories'"
    elif case == "voc_no_size":
        bad = _write(tmp_path / "ann" / "a.xml", "<annotation><filename>a.jpg</filename></annotation>")
        argv = ["convert", "--from", "voc", "--labels", str(bad.parent), "--images", str(tmp_path), "--out", str(tmp_path / "o.json")]
        expect = "missing <size>"
    else:
        (tmp_path / "images").mkdir()
        Image.new("RGB", (10, 10)).save(tmp_path / "images" / "a.png")
        bad = _write(tmp_path / "labels" / "a.txt", "0 0.5 0.5 0.1\n")
        names = _write(tmp_path / "names.txt", "x\n")
        argv = ["convert", "--from", "yolo", "--labels", str(bad.parent), "--images", str(tmp_path / "images"),
                "--names", str(names), "--out", str(tmp_path / "o.json")]
        expect = ":1: expected 5 numbers"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {bad}") and expect in err
    assert "Traceback" not in err and not (tmp_path / "o.json").exists()


def test_console_script_reports_without_traceback(tmp_path):
    bad = _write(tmp_path / "gt.json", "{not json")
    proc = subprocess.run([sys.executable, "-m", "vision.cli", "eval-dets", "--gt", str(bad), "--dets", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: invalid JSON at line 1, column 2: Expecting property name enclosed in double quotes"


def test_convert_does_not_pass_bad_annotations_through(tmp_path, capsys):
    img = {"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}
    cats = [{"id": 1, "name": "x"}]
    out = tmp_path / "o.json"
    out.write_text("previous output")
    bad = _write(tmp_path / "a.json", json.dumps({"images": [img], "categories": cats, "annotations": [
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "segmentation": [0, 0, 2, 0, 2, 2]}]}))
    argv = ["convert", "--from", "coco", "--labels", str(bad), "--images", str(tmp_path), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}: annotation 5 (image 'a.jpg'): segmentation is a flat list of 6 numbers" \
        " (expected a list of polygons [[x1, y1, x2, y2, ...]])\n"
    assert out.read_text() == "previous output"  # nothing already written is lost


def test_convert_outside_paths_only_on_purpose(tmp_path, capsys):
    img = {"id": 1, "file_name": "../elsewhere/a.jpg", "width": 8, "height": 8}
    src = _write(tmp_path / "a.json", json.dumps({"images": [img], "categories": [{"id": 1, "name": "x"}],
                                                   "annotations": []}))
    argv = ["convert", "--from", "coco", "--labels", str(src), "--images", str(tmp_path), "--out", str(tmp_path / "o.json")]
    assert main(argv) == 2
    assert "file_name '../elsewhere/a.jpg' leads out of the image folder" in capsys.readouterr().err
    assert main([*argv, "--allow-outside-paths"]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["images"][0]["file_name"] == "../elsewhere/a.jpg"
