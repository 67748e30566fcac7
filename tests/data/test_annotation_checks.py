"""Bad annotation values are rejected when read, each with the file, the entry and its image.

Before these checks the values below either raised a TypeError / OverflowError / UnicodeDecodeError
traceback, or were taken silently: ``True`` as category 1, ``"0"`` as a crowd flag, a YOLO width of
``inf`` as a full-width box, a ``../`` file name as a path outside the image folder, RLE counts that
pycocotools would decode past the end of its buffer.
"""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from vision.data.annotation_checks import compressed_runs
from vision.data.coco import read_coco, segmentation_to_mask
from vision.data.voc import read_voc
from vision.data.yolo import read_class_names, read_yolo
from vision.errors import DataError


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _coco(**ann) -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 8}],
        "categories": [{"id": 1, "name": "one"}, {"id": 7, "name": "seven"}],
        "annotations": [{"id": 17, "image_id": 1, "category_id": 7, "bbox": [1, 1, 4, 4], **ann}],
    }


def _read(tmp_path, data, **kwargs):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path, read_coco(path, **kwargs)


def _message(tmp_path, data, **kwargs) -> str:
    with pytest.raises(DataError) as e:
        _read(tmp_path, data, **kwargs)
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{tmp_path / 'ann.json'}: ")
    return text.split(": ", 1)[1]


WHERE = "annotation 17 (image 'a.jpg'): "
RING = [1, 1, 5, 1, 5, 5]


@pytest.mark.parametrize(
    ("segmentation", "problem"),
    [
        ("1 1 5 1 5 5", "segmentation is a string"),
        ("", "segmentation is a string"),
        (RING, "segmentation is a flat list of 6 numbers (expected a list of polygons"),
        ([[1, 1, 5, 1]], "segmentation polygon 1 has 4 numbers (a polygon needs 3 points"),
        ([RING, [1, 1, 5, 1, 5]], "segmentation polygon 2 has an odd count of numbers (5"),
        ([[1, 1, 5, "1", 5, 5]], "segmentation polygon 1 holds the string '1', not a number"),
        ([[1, 1, 5, True, 5, 5]], "segmentation polygon 1 holds true (a boolean), not a number"),
        ([[1, 1, 5, float("nan"), 5, 5]], "segmentation polygon 1 holds nan, not a finite number"),
        ([{"size": [8, 10], "counts": [80]}], "segmentation polygon 1 is an object, not a list of numbers"),
        ({"size": [8, 10]}, "segmentation RLE has no 'counts'"),
        ({"counts": [80]}, "segmentation RLE has no 'size'"),
        ({"size": [10, 8], "counts": [80]}, "segmentation RLE size [10, 8] does not match the image"),
        ({"size": "8x10", "counts": [80]}, "segmentation RLE size must be [height, width]"),
        ({"size": [8, 10], "counts": 80}, "segmentation RLE counts must be a list of run lengths or a compressed"),
        ({"size": [8, 10], "counts": {"a": 1}}, "segmentation RLE counts must be a list of run lengths"),
        ({"size": [8, 10], "counts": [40, 41]}, "segmentation RLE counts cover 81 pixels, not the image's 8x10 = 80"),
        ({"size": [8, 10], "counts": [40, -1, 41]}, "segmentation RLE counts hold -1, not a run length"),
        ({"size": [8, 10], "counts": "~~~"}, "segmentation RLE counts is not a valid compressed RLE string"),
        ({"size": [8, 10], "counts": "1P"}, "segmentation RLE counts is not a valid compressed RLE string"),
        # a real RLE of a 9x10 mask given as the 8x10 image's: pycocotools would write past its buffer
        ({"size": [8, 10], "counts": _rle(np.ones((9, 10)))["counts"]}, "segmentation RLE counts cover 90 pixels"),
        (5, "segmentation must be polygons or an RLE object, got 5"),
    ],
)
def test_malformed_segmentations_are_rejected(tmp_path, segmentation, problem):
    assert _message(tmp_path, _coco(segmentation=segmentation)).startswith(WHERE + problem)


def test_valid_segmentations_still_load_as_pycocotools_reads_them(tmp_path):
    mask = np.zeros((8, 10), np.uint8)
    mask[2:6, 3:9] = 1
    flat = mask.reshape(-1, order="F").astype(int)
    runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, flat, -1]) != 0))  # uncompressed: runs from 0
    uncompressed = {"size": [8, 10], "counts": runs.tolist()}
    data = _coco()
    data["annotations"] = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [3, 2, 6, 4], "segmentation": _rle(mask)},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [3, 2, 6, 4], "segmentation": uncompressed},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "segmentation": [RING]},
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "segmentation": []},  # box only
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 0, 4]},  # zero width: dropped, reported
    ]
    _, ds = _read(tmp_path, data)
    (r,) = ds.records
    assert len(r) == 4 and len(ds.dropped) == 1 and "annotation 5" in ds.dropped[0]
    np.testing.assert_array_equal(segmentation_to_mask(r.segmentations[0], 8, 10), mask)
    np.testing.assert_array_equal(segmentation_to_mask(r.segmentations[1], 8, 10), mask)
    assert r.segmentations[3] is None


def test_compressed_rle_decoding_matches_pycocotools():
    # the decoder behind the RLE check, against pycocotools' own encoder and decoder, many strings at once
    rng = np.random.default_rng(0)
    masks, strings = [], []
    for t in range(200):
        h, w = rng.integers(1, 70, 2)
        mask = rng.random((h, w)) < rng.random() if t % 2 else np.zeros((h, w), bool)
        if t % 4 == 0:
            mask[rng.integers(0, h):, rng.integers(0, w):] = True  # long runs: multi-group counts
        if t == 7:
            mask = np.ones((300, 300), bool)  # one run of 90000: four 5-bit groups
        masks.append(mask)
        strings.append(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"])
    runs, owner, malformed = compressed_runs(strings)
    assert not malformed.any()
    for k, mask in enumerate(masks):
        counts = runs[owner == k]
        h, w = mask.shape
        assert counts.sum() == h * w
        flat = np.repeat(np.arange(len(counts)) % 2, counts).astype(np.uint8)
        np.testing.assert_array_equal(flat.reshape(w, h).T, mask_utils.decode({"size": [h, w], "counts": strings[k]}))
    # one malformed string among good ones is flagged alone, and does not disturb its neighbours
    runs, owner, malformed = compressed_runs([strings[0], b"1P", strings[1], b"", strings[2]])
    assert malformed.tolist() == [False, True, False, True, False]
    assert runs[owner == 4].sum() == masks[2].size


@pytest.mark.parametrize(
    ("ann", "problem"),
    [
        ({"bbox": [0, 0, float("nan"), 1]}, "bbox must be 4 finite numbers [x, y, w, h], got [0, 0, NaN, 1]"),
        ({"bbox": [0, 0, float("inf"), 1]}, "bbox must be 4 finite numbers [x, y, w, h], got [0, 0, Infinity, 1]"),
        ({"bbox": [0, 0, "3", 1]}, "bbox must be 4 finite numbers"),
        ({"bbox": [0, 0, True, 1]}, "bbox must be 4 finite numbers"),
        ({"bbox": [0, 0, 10**400, 1]}, "bbox must be 4 finite numbers"),  # a TypeError traceback before
        ({"bbox": None}, "bbox must be 4 finite numbers [x, y, w, h], got null"),
        ({"category_id": "7"}, "category_id must be an integer, got the string '7'"),
        ({"category_id": 7.0}, "category_id must be an integer, got 7.0 (not a whole number)"),
        ({"category_id": True}, "category_id must be an integer, got true (a boolean)"),  # was category 1
        ({"category_id": 3}, "category_id 3 is not in 'categories'"),
        ({"iscrowd": "0"}, "iscrowd must be 0 or 1, got the string '0'"),  # was a crowd region
        ({"iscrowd": 2}, "iscrowd must be 0 or 1, got 2"),
    ],
)
def test_bad_annotation_values_are_named(tmp_path, ann, problem):
    assert _message(tmp_path, _coco(**ann)).startswith(WHERE + problem)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["categories"].append({"id": "9", "name": "nine"}),
         "category '9': id must be an integer, got the string '9'"),  # int("9") before
        (lambda d: d["categories"].append({"id": 9.5}), "category 9.5: id must be an integer"),
        (lambda d: d["categories"].append({"id": False}), "category False: id must be an integer, got false"),
        (lambda d: d["images"].append({"id": "b", "file_name": "b.jpg", "width": 5, "height": 5}),
         "image 'b': id must be an integer, got the string 'b'"),
        (lambda d: d["images"].append({"id": [2], "file_name": "b.jpg", "width": 5, "height": 5}),
         "image [2]: id must be an integer, got a list of 1"),  # unhashable: a TypeError before
        (lambda d: d["images"].append({"id": 2, "file_name": 5, "width": 5, "height": 5}),
         "image 2: file_name must be a non-empty string, got 5"),
        (lambda d: d["images"].append(7), "image at index 1 in 'images' must be an object, got 7"),
        (lambda d: d["annotations"].append("x"), "annotation at index 1 in 'annotations' must be an object"),
        (lambda d: d["annotations"].append({"image_id": [1], "category_id": 1}),
         "annotation at index 1: image_id a list of 1 is not in 'images'"),
        (lambda d: d["annotations"][0].pop("id") and d["annotations"][0].update(segmentation="x"),
         "annotation at index 0 (image 'a.jpg'): segmentation is a string"),
        (lambda d: d.update(categories={"id": 1}), "'categories' must be a list, got an object"),
    ],
)
def test_bad_entries_are_named(tmp_path, mutate, message):
    data = _coco()
    mutate(data)
    assert _message(tmp_path, data).startswith(message)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../secret.jpg", "file_name '../secret.jpg' leads out of the image folder ('..')"),
        ("sub/../../x.jpg", "file_name 'sub/../../x.jpg' leads out of the image folder"),
        ("..\\x.jpg", "file_name '..\\\\x.jpg' leads out of the image folder"),
        ("/etc/passwd", "file_name '/etc/passwd' is an absolute path"),
        ("C:\\data\\a.jpg", "file_name 'C:\\\\data\\\\a.jpg' is an absolute path"),
    ],
)
def test_file_names_leaving_the_image_folder_are_rejected_unless_allowed(tmp_path, name, problem):
    data = _coco()
    data["images"][0]["file_name"] = name
    assert _message(tmp_path, data).startswith(f"image 1: {problem}")
    _, ds = _read(tmp_path, data, images_dir=tmp_path / "img", allow_outside_paths=True)
    assert ds.records[0].file_name == name


def test_names_inside_the_image_folder_are_fine(tmp_path):
    data = _coco()
    data["images"][0]["file_name"] = "sub/dir/a..b.jpg"
    _, ds = _read(tmp_path, data, images_dir=tmp_path)
    assert ds.records[0].path == str(tmp_path / "sub/dir/a..b.jpg")


# VOC --------------------------------------------------------------------------------------------------

VOC = """<annotation><filename>{filename}</filename>
  <size><width>{width}</width><height>50</height></size>
  <object><name>cell</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>{xmax}</xmax><ymax>5</ymax></bndbox></object>
</annotation>"""


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"width": "1e400"}, "<size>: <width> is not a finite number ('1e400')"),  # OverflowError before
        ({"width": "nan"}, "<size>: <width> is not a finite number ('nan')"),  # ValueError before
        ({"width": "100.5"}, "<size>: <width> must be a positive whole number of pixels, got '100.5'"),  # was 100
        ({"width": "0"}, "<size>: <width> must be a positive whole number of pixels, got '0'"),
        ({"xmax": "inf"}, "object 1 (cell): <xmax> is not a finite number ('inf')"),  # was a box to the border
        ({"xmax": "nan"}, "object 1 (cell): <xmax> is not a finite number ('nan')"),
        ({"filename": "../x.jpg"}, "<filename>: '../x.jpg' leads out of the image folder ('..')"),
        ({"filename": "/abs/x.jpg"}, "<filename>: '/abs/x.jpg' is an absolute path"),
    ],
)
def test_voc_bad_values_are_named(tmp_path, fields, problem):
    (tmp_path / "ann").mkdir()
    values = {"filename": "x.jpg", "width": "100", "xmax": "10", **fields}
    path = tmp_path / "ann" / "x.xml"
    path.write_text(VOC.format(**values))
    with pytest.raises(DataError) as e:
        read_voc(tmp_path / "ann")
    assert str(e.value).startswith(f"{path}: {problem}")


def test_voc_outside_paths_allowed_on_purpose(tmp_path):
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "x.xml").write_text(VOC.format(filename="/abs/x.jpg", width=100, xmax=10))
    ds = read_voc(tmp_path / "ann", allow_outside_paths=True)
    assert ds.records[0].path == "/abs/x.jpg"


# YOLO -------------------------------------------------------------------------------------------------


def _yolo(tmp_path, line: str, names=("car", "person")):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "labels").mkdir(exist_ok=True)
    Image.new("RGB", (200, 100)).save(tmp_path / "images" / "a.png")
    (tmp_path / "labels" / "a.txt").write_text(line + "\n")
    return read_yolo(tmp_path / "labels", tmp_path / "images", list(names))


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("0 0.5 0.5 1e400 0.2", "width 1e400 is not a fraction of the image side in [0, 1]"),  # full-width box before
        ("0 0.5 0.5 inf 0.2", "width inf is not a fraction"),
        ("0 nan 0.5 0.1 0.2", "cx nan is not a fraction"),
        ("0 0.5 0.5 0.1 -0.2", "height -0.2 is not a fraction"),
        ("0 320 240 50 60", "cx 320 is not a fraction"),  # pixel coordinates written by mistake
        ("1 0.1 0.1 0.3 0.1 0.3 1.5", "coordinate 1.5 is not a fraction"),
    ],
)
def test_yolo_non_finite_and_out_of_range_numbers_are_rejected(tmp_path, line, problem):
    with pytest.raises(DataError) as e:
        _yolo(tmp_path, line)
    assert str(e.value).startswith(f"{tmp_path / 'labels' / 'a.txt'}:1: {problem}")
    assert str(e.value).endswith("(YOLO coordinates are normalised)")


def test_yolo_edge_values_and_zero_sizes_keep_their_meaning(tmp_path):
    ds = _yolo(tmp_path, "0 1.0000001 0.5 0 0.2\n1 0 0 1 1")
    (r,) = ds.records
    np.testing.assert_allclose(r.boxes, [[0, 0, 100, 50]])  # the zero-width box is dropped ...
    assert len(ds.dropped) == 1 and "object 1 has a zero-area box" in ds.dropped[0]  # ... and reported


def test_yolo_unreadable_text_files_are_data_errors(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "images" / "a.png")
    (tmp_path / "labels" / "a.txt").write_bytes(b"\xff\xfe0 0.5")
    with pytest.raises(DataError, match=r"a\.txt: cannot read label file \('utf-8' codec"):
        read_yolo(tmp_path / "labels", tmp_path / "images", ["car"])
    names = tmp_path / "names.txt"
    names.write_bytes(b"car\n\xff\n")
    with pytest.raises(DataError, match=r"names\.txt: cannot read class names"):
        read_class_names(names)
    names.write_text("car\nperson\ncar\n")
    with pytest.raises(DataError, match=r"names\.txt: class name 'car' appears twice"):
        read_class_names(names)


def test_list_files_that_are_not_text_are_data_errors(tmp_path):
    from vision.data.classification import read_label_csv
    from vision.data.semantic import read_mask_list
    from vision.data.voc import read_voc

    blob = tmp_path / "blob.txt"
    blob.write_bytes(b"a.png,\xff\xfe\n")
    with pytest.raises(DataError, match=r"blob\.txt: cannot read the label file \('utf-8' codec"):
        read_label_csv(blob)
    with pytest.raises(DataError, match=r"blob\.txt: cannot read list file \('utf-8' codec"):
        read_mask_list(str(blob), ["x"])
    (tmp_path / "ann").mkdir()
    with pytest.raises(DataError, match=r"blob\.txt: cannot read image list \('utf-8' codec"):
        read_voc(tmp_path / "ann", ids_file=blob)
