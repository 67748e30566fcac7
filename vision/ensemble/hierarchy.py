"""Class hierarchies and parent-class expansion (Open Images style).

Open Images evaluates a detection of "Man" as a detection of "Person" too: the ground truth carries
every box under its class and all its ancestors, so detectors must emit the parent copies as well.
This module reads the hierarchy, lists a class's ancestors, expands ground truth the way the challenge
evaluation does, and expands detections (each detection also yields a copy for every ancestor; copies
of one class that overlap are merged with a fusion method, as the winning solutions did after
inference).

Formats read:
- the Open Images hierarchy JSON: nested ``{"LabelName": ..., "Subcategory": [...]}``.  As in the
  official expansion script, only ``Subcategory`` links are parent links; ``Part`` lists are
  part-of relations (a wheel is part of a car, not a kind of car) and are ignored.  A class listed
  under several parents has all of them; the top node (the root, "Entity") is never an ancestor.
- a plain ``{"child": ["parent", ...]}`` JSON (a single parent may be a string).
With a class-descriptions CSV (``/m/...,Name`` lines, optional header) Open Images MIDs are shown as
names; a category may be matched either by MID or by name.

Categories are matched to hierarchy nodes by ``name``.  Ancestors missing from a categories list are
added as new categories with fresh ids (one more than the largest id, in order of name), the same way
for ground truth and for detections, so the two agree when expanded against the same categories.
"""

from __future__ import annotations

import copy
import csv
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from vision.errors import DataError


@dataclass
class Hierarchy:
    """Parent links between class names (root excluded)."""

    parents: dict[str, set[str]]
    root: str | None = None
    aliases: dict[str, str] = field(default_factory=dict)  # MID or other spelling -> node name

    def __post_init__(self) -> None:
        for ps in list(self.parents.values()):
            for p in ps:
                self.parents.setdefault(p, set())

    def resolve(self, name: str) -> str | None:
        """The node a category name refers to (by node name, or by MID when descriptions were loaded)."""
        if name in self.parents:
            return name
        return self.aliases.get(name)

    def nodes(self) -> set[str]:
        """Every class in the hierarchy (root excluded)."""
        return set(self.parents)

    def ancestors(self, name: str) -> set[str]:
        """All ancestors of ``name`` (parents, their parents, ...), root excluded; empty if unknown."""
        node = self.resolve(name)
        if node is None:
            return set()
        seen: set[str] = set()
        stack = list(self.parents.get(node, ()))
        while stack:
            p = stack.pop()
            if p in seen or p == node:
                continue
            seen.add(p)
            stack.extend(self.parents.get(p, ()))
        return seen


def _read_descriptions(path: str | os.PathLike) -> dict[str, str]:
    if not os.path.isfile(path):
        raise DataError(path, "class descriptions file not found")
    names: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row:
                continue
            if len(row) < 2:
                raise DataError(path, f"line {i + 1}: expected 'label,name'")
            mid, name = row[0].strip(), row[1].strip()
            if i == 0 and not mid.startswith("/"):
                continue  # header line
            names[mid] = name
    dup = {n for n in names.values() if list(names.values()).count(n) > 1}
    if dup:
        raise DataError(path, f"names used by several labels: {', '.join(sorted(dup)[:5])}")
    return names


def _walk_openimages(node: Mapping, path: str, parents: dict[str, set[str]], root: str) -> None:
    label = node.get("LabelName")
    if not isinstance(label, str):
        raise DataError(path, "every hierarchy node needs a 'LabelName' string")
    subs = node.get("Subcategory", [])
    if not isinstance(subs, list):
        raise DataError(path, f"'Subcategory' of {label} is not a list")
    for child in subs:
        if not isinstance(child, Mapping):
            raise DataError(path, f"a 'Subcategory' entry of {label} is not an object")
        _walk_openimages(child, path, parents, root)  # checks the child's LabelName first
        parents.setdefault(child["LabelName"], set())
        if label != root:
            parents[child["LabelName"]].add(label)


def load_hierarchy(path: str | os.PathLike, descriptions: str | os.PathLike | None = None) -> Hierarchy:
    """Read an Open Images hierarchy JSON or a plain ``{child: [parents]}`` JSON."""
    from vision.ensemble.results import read_json

    data = read_json(path, "hierarchy")
    parents: dict[str, set[str]] = {}
    root = None
    if isinstance(data, Mapping) and "LabelName" in data:
        root = data["LabelName"]
        _walk_openimages(data, os.fspath(path), parents, root)
    elif isinstance(data, Mapping):
        for child, ps in data.items():
            if isinstance(ps, str):
                ps = [ps]
            if not isinstance(ps, list) or not all(isinstance(p, str) for p in ps):
                raise DataError(path, f"parents of '{child}' must be a name or a list of names")
            parents.setdefault(child, set()).update(ps)
    else:
        raise DataError(path, "expected an Open Images hierarchy (LabelName/Subcategory) or {child: [parents]}")
    h = Hierarchy(parents, root)
    if descriptions is not None:
        h = _renamed(h, _read_descriptions(descriptions))
    return h


def _renamed(h: Hierarchy, names: Mapping[str, str]) -> Hierarchy:
    """The same hierarchy with labels shown by name (MIDs stay resolvable as aliases)."""
    rn = lambda x: names.get(x, x)  # noqa: E731
    parents = {rn(c): {rn(p) for p in ps} for c, ps in h.parents.items()}
    aliases = {mid: name for mid, name in names.items() if name in parents or mid in h.parents}
    return Hierarchy(parents, rn(h.root) if h.root else None, aliases)


def extend_categories(categories: Sequence[Mapping], hierarchy: Hierarchy) -> tuple[list[dict], dict[int, list[int]]]:
    """Categories plus any missing ancestors, and each category id's ancestor ids.

    A missing ancestor becomes ``{"id": next id, "name": node name, "supercategory": "hierarchy"}``;
    ids are handed out in order of name after the largest existing id, so repeated calls agree.
    """
    cats = [dict(c) for c in categories]
    by_node: dict[str, int] = {}
    for c in cats:
        node = hierarchy.resolve(str(c.get("name", "")))
        if node is not None and node not in by_node:
            by_node[node] = c["id"]
    needed: set[str] = set()
    for node in list(by_node):
        needed |= hierarchy.ancestors(node)
    next_id = max((int(c["id"]) for c in cats), default=0) + 1
    for node in sorted(needed - set(by_node)):
        cats.append({"id": next_id, "name": node, "supercategory": "hierarchy"})
        by_node[node] = next_id
        next_id += 1
    ancestor_ids: dict[int, list[int]] = {}
    for c in cats:
        node = hierarchy.resolve(str(c.get("name", "")))
        if node is None:
            continue
        ancestor_ids[c["id"]] = sorted(by_node[a] for a in hierarchy.ancestors(node))
    return cats, ancestor_ids


def expand_coco_ground_truth(gt: Mapping, hierarchy: Hierarchy) -> dict:
    """Ground truth as the Open Images challenge evaluates it: every box also under each ancestor.

    Returns a new COCO dict; copies keep every field of the original annotation (bbox, area, iscrowd,
    segmentation) with a new id and the ancestor's category id.  Categories missing from ``gt`` are
    added (see ``extend_categories``); annotations of classes outside the hierarchy are left alone.
    """
    out = {k: v for k, v in gt.items() if k not in ("annotations", "categories")}
    cats, ancestor_ids = extend_categories(gt.get("categories", []), hierarchy)
    anns = [dict(a) for a in gt.get("annotations", [])]
    next_id = max((int(a["id"]) for a in anns if "id" in a), default=0) + 1
    expanded = list(anns)
    for a in anns:
        for cid in ancestor_ids.get(a["category_id"], ()):
            c = copy.deepcopy(a)
            c["id"] = next_id
            c["category_id"] = cid
            next_id += 1
            expanded.append(c)
    out["categories"] = cats
    out["annotations"] = expanded
    return out


def expand_detections(
    dets: Iterable[Mapping],
    hierarchy: Hierarchy,
    categories: Sequence[Mapping],
    image_sizes: Mapping[int, tuple[int, int]] | None = None,
    merge: str | None = "nms",
    iou_thr: float | None = None,
    names: tuple[str, str] = ("detections", "images"),
) -> tuple[list[dict], list[dict]]:
    """Add a copy of every detection for each ancestor class; merge overlapping copies of a class.

    ``merge`` is a fusion method (``nms``, ``soft_nms``, ``wbf``, ``sum``) or None to keep every copy.
    It runs, per image, over the classes that received copies (their own detections and the copies
    together), so a parent predicted both directly and through its children ends with one box per
    object.  Merging needs ``image_sizes``.  Returns (detections, categories) with any ancestors the
    categories list lacked added.
    """
    from vision.ensemble.results import fuse_results

    cats, ancestor_ids = extend_categories(categories, hierarchy)
    originals = [dict(d) for d in dets]
    copies: list[dict] = []
    for d in originals:
        for cid in ancestor_ids.get(d["category_id"], ()):
            c = dict(d)
            c["category_id"] = cid
            copies.append(c)
    if merge is None or not copies:
        return originals + copies, cats
    if image_sizes is None:
        raise ValueError("merging parent copies needs image sizes")
    touched = defaultdict(set)
    for c in copies:
        touched[c["image_id"]].add(c["category_id"])
    keep = [d for d in originals if d["category_id"] not in touched[d["image_id"]]]
    group = [d for d in originals if d["category_id"] in touched[d["image_id"]]] + copies
    merged = fuse_results(
        [group], image_sizes, merge, iou_thr=iou_thr, names=[names[0]], images_name=names[1]
    )
    return keep + merged, cats
