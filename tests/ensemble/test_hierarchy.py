"""Class hierarchy: ancestors, ground-truth expansion, detection expansion."""

from __future__ import annotations

import json

import pytest

from tests.helpers import SHARED_DATA
from vision.ensemble.hierarchy import expand_coco_ground_truth, expand_detections, load_hierarchy
from vision.errors import DataError

OPENIMAGES = SHARED_DATA / "openimages"

# Open Images layout: Cat under both Animal and Pet; Wheel is a Part of Car (not a kind of car), and
# Tyre appears only inside that Part entry, so it is not in the hierarchy at all.
SMALL = {
    "LabelName": "/m/root",
    "Subcategory": [
        {"LabelName": "/m/animal", "Subcategory": [
            {"LabelName": "/m/dog"},
            {"LabelName": "/m/cat", "Subcategory": [{"LabelName": "/m/kitten"}]},
        ]},
        {"LabelName": "/m/pet", "Subcategory": [{"LabelName": "/m/cat"}, {"LabelName": "/m/dog"}]},
        {"LabelName": "/m/car", "Part": [{"LabelName": "/m/wheel", "Subcategory": [{"LabelName": "/m/tyre"}]}]},
        {"LabelName": "/m/wheel"},
    ],
}
NAMES = "label,class\n/m/animal,Animal\n/m/dog,Dog\n/m/cat,Cat\n/m/kitten,Kitten\n/m/pet,Pet\n/m/car,Car\n/m/wheel,Wheel\n"


@pytest.fixture
def small(tmp_path):
    (tmp_path / "h.json").write_text(json.dumps(SMALL))
    (tmp_path / "names.csv").write_text(NAMES)
    return load_hierarchy(tmp_path / "h.json", tmp_path / "names.csv")


def test_ancestors_small_openimages_hierarchy(small):
    assert small.ancestors("Kitten") == {"Cat", "Animal", "Pet"}
    assert small.ancestors("Dog") == {"Animal", "Pet"}
    assert small.ancestors("Animal") == set()  # the root is never an ancestor
    assert small.ancestors("Wheel") == set()  # part-of is not a parent link
    assert small.ancestors("/m/kitten") == {"Cat", "Animal", "Pet"}  # MIDs resolve through the CSV
    assert small.ancestors("Tyre") == set() and small.resolve("/m/tyre") is None
    assert "Entity" not in small.nodes() and "/m/root" not in small.nodes()


def test_plain_child_parents_json(tmp_path):
    (tmp_path / "h.json").write_text(json.dumps({"Man": ["Person"], "Person": "Mammal", "Mammal": ["Animal"]}))
    h = load_hierarchy(tmp_path / "h.json")
    assert h.ancestors("Man") == {"Person", "Mammal", "Animal"}
    assert h.ancestors("Animal") == set()


def test_bad_hierarchy_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_hierarchy(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        load_hierarchy(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"list\.json"):
        load_hierarchy(tmp_path / "list.json")


def test_expand_ground_truth_hand_example(small):
    gt = {
        "images": [{"id": 1, "width": 10, "height": 10}],
        "categories": [{"id": 5, "name": "Kitten"}, {"id": 2, "name": "Animal"}, {"id": 9, "name": "Wheel"}],
        "annotations": [
            {"id": 4, "image_id": 1, "category_id": 5, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0},
            {"id": 8, "image_id": 1, "category_id": 9, "bbox": [5, 5, 1, 1], "area": 1, "iscrowd": 0},
        ],
    }
    out = expand_coco_ground_truth(gt, small)
    # Cat and Pet are missing: added in name order after the largest id.
    assert out["categories"][3:] == [
        {"id": 10, "name": "Cat", "supercategory": "hierarchy"},
        {"id": 11, "name": "Pet", "supercategory": "hierarchy"},
    ]
    anns = sorted((a["category_id"], a["id"], tuple(a["bbox"])) for a in out["annotations"])
    assert anns == [(2, 9, (1, 1, 2, 2)), (5, 4, (1, 1, 2, 2)), (9, 8, (5, 5, 1, 1)),
                    (10, 10, (1, 1, 2, 2)), (11, 11, (1, 1, 2, 2))]
    assert gt["categories"][-1]["name"] == "Wheel" and len(gt["annotations"]) == 2  # input untouched


def test_expand_detections_merges_overlapping_parent_copies(small):
    cats = [{"id": 1, "name": "Dog"}, {"id": 2, "name": "Cat"}, {"id": 3, "name": "Animal"}, {"id": 4, "name": "Pet"}]
    sizes = {7: (100, 100)}
    dets = [
        {"image_id": 7, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
        {"image_id": 7, "category_id": 2, "bbox": [12, 10, 40, 40], "score": 0.6},  # same object, IoU ~0.9
        {"image_id": 7, "category_id": 3, "bbox": [11, 11, 40, 40], "score": 0.7},  # a direct Animal box
        {"image_id": 7, "category_id": 2, "bbox": [60, 60, 30, 30], "score": 0.5},  # a lone cat
    ]
    out, out_cats = expand_detections(dets, small, cats, sizes, merge="nms", iou_thr=0.5)
    assert out_cats == cats
    got = sorted((d["category_id"], round(d["score"], 6), tuple(round(v, 6) for v in d["bbox"])) for d in out)
    assert got == [
        (1, 0.9, (10, 10, 40, 40)),
        (2, 0.5, (60, 60, 30, 30)),
        (2, 0.6, (12, 10, 40, 40)),
        (3, 0.5, (60, 60, 30, 30)),
        (3, 0.9, (10, 10, 40, 40)),
        (4, 0.5, (60, 60, 30, 30)),
        (4, 0.9, (10, 10, 40, 40)),
    ]
    unmerged, _ = expand_detections(dets, small, cats, sizes, merge=None)
    assert len(unmerged) == 4 + 2 + 2 + 0 + 2  # dog +2, cat +2 each, animal +0


def independent_ancestors(tree: dict) -> dict[str, set[str]]:
    """Every path from the root in the nested JSON, following Subcategory only; root left out."""
    result: dict[str, set[str]] = {}

    def visit(node, path):
        result.setdefault(node["LabelName"], set()).update(path)
        for child in node.get("Subcategory", []):
            visit(child, [*path, node["LabelName"]])

    for child in tree.get("Subcategory", []):
        visit(child, [])
    return result


@pytest.mark.skipif(not OPENIMAGES.is_dir(), reason="../shared/data/openimages not present")
def test_real_openimages_hierarchy_expands_to_exact_ancestors():
    tree = json.loads((OPENIMAGES / "bbox_labels_600_hierarchy.json").read_text())
    lines = (OPENIMAGES / "class-descriptions-boxable.csv").read_text().strip().splitlines()
    mids = [ln.split(",", 1)[0] for ln in lines if ln.startswith("/m/")]
    name_of = {ln.split(",", 1)[0]: ln.split(",", 1)[1] for ln in lines if ln.startswith("/m/")}
    assert len(mids) >= 600
    expected = independent_ancestors(tree)
    h = load_hierarchy(OPENIMAGES / "bbox_labels_600_hierarchy.json", OPENIMAGES / "class-descriptions-boxable.csv")
    cats = [{"id": i + 1, "name": name_of[m]} for i, m in enumerate(mids)]
    id_of = {c["name"]: c["id"] for c in cats}
    # One detection of every class, each in its own image so nothing merges across classes.
    dets = [{"image_id": i, "category_id": c["id"], "bbox": [1, 1, 5, 5], "score": 0.5} for i, c in enumerate(cats)]
    sizes = {i: (10, 10) for i in range(len(cats))}
    for merge in (None, "nms"):
        out, out_cats = expand_detections(dets, h, cats, sizes, merge=merge)
        assert out_cats == cats  # every ancestor is itself one of the boxable classes
        by_image: dict[int, set[int]] = {}
        for d in out:
            by_image.setdefault(d["image_id"], set()).add(d["category_id"])
        for i, mid in enumerate(mids):
            want = {id_of[name_of[mid]]} | {id_of[name_of[a]] for a in expected[mid]}
            assert by_image[i] == want, name_of[mid]
    assert h.ancestors("Man") == {"Person"}
