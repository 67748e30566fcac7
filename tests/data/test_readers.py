"""Readers against hand-computed answers, on the quirks real exports have."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from vision.data.coco import read_coco, to_coco_dict
from vision.data.voc import read_voc
from vision.data.yolo import read_yolo
from vision.errors import DataError


def _coco_quirks():
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((4, 6), np.uint8), ((2, 4), (3, 1)))))
    rle["counts"] = rle["counts"].decode()
    return {
        "images": [
            {"id": 10, "file_name": "a.jpg", "width": 10, "height": 10},
            {"id": 11, "file_name": "b.jpg", "width": 20.0, "height": 8},  # float sizes from some tools
            {"id": 12, "file_name": "empty.jpg", "width": 5, "height": 5},
        ],
        "categories": [
            {"id": 0, "name": "placeholder"},  # Roboflow-style category nobody uses
            {"id": 7, "name": "cat"},
            {"id": 90, "name": "dog"},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [-2, 1, 5, 4], "iscrowd": 0},  # past the left border
            {"id": 2, "image_id": 10, "category_id": 90, "bbox": [3, 2, 6, 4], "segmentation": rle, "iscrowd": 1},
            {"id": 3, "image_id": 11, "category_id": 7, "bbox": [4, 4, 0, 3]},  # zero width: dropped
            {"id": 4, "image_id": 11, "category_id": 90, "bbox": [15, 2, 10, 10],
             "segmentation": [[15, 2, 19, 2, 19, 7, 15, 7]]},  # polygon, reaches past the right/bottom border
        ],
    }


def test_coco_quirks_load(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(_coco_quirks()))
    ds = read_coco(path, tmp_path / "imgs")
    assert ds.categories.ids == (0, 7, 90) and ds.categories.names == ("placeholder", "cat", "dog")
    a, b, empty = ds.records
    assert a.path == str(tmp_path / "imgs" / "a.jpg")
    np.testing.assert_allclose(a.boxes, [[0, 1, 3, 5], [3, 2, 9, 6]])  # clipped at x=0
    assert a.labels.tolist() == [2, 3] and a.iscrowd.tolist() == [False, True]
    assert b.width == 20 and len(b) == 1  # the zero-width box is gone
    np.testing.assert_allclose(b.boxes, [[15, 2, 20, 8]])  # clipped to 20x8
    assert len(ds.dropped) == 1 and "annotation 3" in ds.dropped[0]
    assert len(empty) == 0
    # Written back out: the user's category ids, mask areas from the RLE, crowd kept.
    out = to_coco_dict(ds)
    assert [c["id"] for c in out["categories"]] == [0, 7, 90]
    crowd = next(a for a in out["annotations"] if a["iscrowd"] == 1)
    assert crowd["category_id"] == 90 and crowd["area"] == 24.0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["annotations"].append({"id": 9, "image_id": 99, "category_id": 7, "bbox": [0, 0, 1, 1]}),
         "annotation 9: image_id 99 is not in 'images'"),
        (lambda d: d["annotations"].append({"id": 9, "image_id": 10, "category_id": 5, "bbox": [0, 0, 1, 1]}),
         "annotation 9 (image 'a.jpg'): category_id 5 is not in 'categories'"),
        (lambda d: d["annotations"].append({"id": 9, "image_id": 10, "category_id": 7, "bbox": [0, 0, 1]}),
         "annotation 9 (image 'a.jpg'): bbox must be 4 finite numbers"),
        (lambda d: d["images"].append({"id": 10, "file_name": "dup.jpg", "width": 1, "height": 1}),
         "image id 10 appears twice"),
        (lambda d: d["images"][0].pop("width"), "image 10 (a.jpg): width and height must be positive integers"),
    ],
)
def test_coco_bad_entries_are_named(tmp_path, mutate, message):
    data = _coco_quirks()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError) as e:
        read_coco(path)
    assert str(e.value) == f"{path}: {message}" or str(e.value).startswith(f"{path}: {message}")


def test_coco_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 2, column 12"):
        read_coco(path)


VOC_XML = """<annotation>
  <filename>{name}.jpg</filename>
  {size}
  <object><name>cell</name><difficult>0</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>5</ymax></bndbox></object>
  <object><name>blob</name><difficult>1</difficult>
    <bndbox><xmin>95</xmin><ymin>40</ymin><xmax>110</xmax><ymax>50</ymax></bndbox></object>
  <object><name>cell</name><difficult>0</difficult>
    <bndbox><xmin>7</xmin><ymin>7</ymin><xmax>7</xmax><ymax>9</ymax></bndbox></object>
</annotation>"""


def test_voc_is_converted_from_one_based_pixels(tmp_path):
    (tmp_path / "ann").mkdir()
    size = "<size><width>100</width><height>50</height><depth>3</depth></size>"
    (tmp_path / "ann" / "x.xml").write_text(VOC_XML.format(name="x", size=size))
    ds = read_voc(tmp_path / "ann", tmp_path / "img")
    assert ds.categories.names == ("blob", "cell")  # sorted, so the order never depends on the files
    (r,) = ds.records
    # (1,1)-(10,5) in 1-based inclusive pixels covers 0..10 x 0..5; the second box is clipped to 100x50.
    np.testing.assert_allclose(r.boxes, [[0, 0, 10, 5], [94, 39, 100, 50]])
    assert r.labels.tolist() == [2, 1] and r.difficult.tolist() == [False, True]
    assert len(ds.dropped) == 1 and "x.xml: object 3 (cell)" in ds.dropped[0]  # xmax == xmin
    assert r.path == str(tmp_path / "img" / "x.jpg")


def test_voc_without_size_is_rejected(tmp_path):
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "nosize.xml").write_text(VOC_XML.format(name="n", size=""))
    with pytest.raises(DataError, match=r"nosize\.xml: missing <size>"):
        read_voc(tmp_path / "ann")


def test_voc_unknown_class_is_rejected(tmp_path):
    (tmp_path / "ann").mkdir()
    size = "<size><width>100</width><height>50</height></size>"
    (tmp_path / "ann" / "x.xml").write_text(VOC_XML.format(name="x", size=size))
    with pytest.raises(DataError, match=r"x\.xml: class 'blob' is not among the class names"):
        read_voc(tmp_path / "ann", class_names=["cell"])


def _yolo_tree(tmp_path, lines):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (200, 100)).save(tmp_path / "images" / "a.png")
    Image.new("L", (50, 40)).save(tmp_path / "images" / "nolabel.png")
    (tmp_path / "labels" / "a.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "names.txt").write_text("car\nperson\n")


def test_yolo_boxes_and_polygons(tmp_path):
    _yolo_tree(tmp_path, ["0 0.5 0.5 0.2 0.4", "", "1 0.1 0.1 0.3 0.1 0.3 0.5", "1 0.99 0.5 0.1 0.2"])
    ds = read_yolo(tmp_path / "labels", tmp_path / "images", tmp_path / "names.txt")
    assert ds.categories.ids == (1, 2) and ds.categories.names == ("car", "person")
    a, empty = ds.records
    assert (a.width, a.height) == (200, 100) and (empty.width, empty.height) == (50, 40)
    np.testing.assert_allclose(a.boxes, [[80, 30, 120, 70], [20, 10, 60, 50], [188, 40, 200, 60]], atol=1e-4)
    assert a.labels.tolist() == [1, 2, 2]
    assert a.segmentations[0] is None and a.segmentations[1] == [[20.0, 10.0, 60.0, 10.0, 60.0, 50.0]]
    assert len(empty) == 0


def test_yolo_line_with_four_numbers_names_file_and_line(tmp_path):
    _yolo_tree(tmp_path, ["0 0.5 0.5 0.2 0.4", "1 0.5 0.5 0.2"])
    with pytest.raises(DataError) as e:
        read_yolo(tmp_path / "labels", tmp_path / "images", tmp_path / "names.txt")
    assert str(e.value).startswith(f"{tmp_path / 'labels' / 'a.txt'}:2: expected 5 numbers")


def test_yolo_unreadable_image_is_skipped_and_reported(tmp_path):
    _yolo_tree(tmp_path, ["0 0.5 0.5 0.2 0.4"])
    (tmp_path / "images" / "broken.jpg").write_text("not a jpeg")
    ds = read_yolo(tmp_path / "labels", tmp_path / "images", ["car", "person"])
    assert len(ds) == 2 and len(ds.skipped_images) == 1 and "broken.jpg" in ds.skipped_images[0]
