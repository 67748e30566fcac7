"""The compiled COCO results reader (``vision/ensemble/_columns.c``) against msgspec and Python's json.

Every value it returns must equal, bit for bit, what msgspec decodes (and float() parses) from the same
text; everything it declines (None) must be something the general readers then handle.
"""

from __future__ import annotations

import json
import math
import random
from decimal import Decimal, getcontext

import msgspec
import numpy as np
import pytest

from vision.ensemble import results
from vision.ensemble._columns import read_columns  # built by the install; the fallback is tested below


def _columns(text: str | bytes):
    raw = text.encode() if isinstance(text, str) else text
    got = read_columns(raw)
    if got is None:
        return None
    n, image_id, category_id, bbox, score = got
    return (np.frombuffer(image_id, np.int64), np.frombuffer(category_id, np.int64),
            np.frombuffer(bbox, np.float64).reshape(n, 4), np.frombuffer(score, np.float64))


def _document(numbers: list[str]) -> str:
    return "[" + ",".join(
        f'{{"image_id":{i},"category_id":{i % 7},"bbox":[{t},{t},{t},{t}],"score":{t}}}'
        for i, t in enumerate(numbers)) + "]"


def _number_texts(seed: int) -> list[str]:
    """repr() of doubles of every magnitude, random decimals of 1-25 digits, and decimals within a
    digit or two of halfway between two doubles (the cases a fast parser gets wrong)."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**64, 60_000, dtype=np.uint64, endpoint=False)
    values = [v for v in bits.view(np.float64).tolist() if math.isfinite(v)]
    texts = [repr(v) for v in values]
    texts += [repr(v) for v in rng.uniform(0, 1333, 20_000).tolist()]  # pixel boxes, as predict writes them
    r = random.Random(seed)
    for _ in range(20_000):
        digits = "".join(r.choice("0123456789") for _ in range(r.randint(1, 25))).lstrip("0") or "0"
        if len(digits) > 1 and r.random() < 0.5:
            k = r.randint(1, len(digits) - 1)
            digits = f"{digits[:k]}.{digits[k:]}"
        if r.random() < 0.6:
            digits += f"{r.choice('eE')}{r.choice(['', '+', '-'])}{r.randint(0, 340)}"
        texts.append(("-" if r.random() < 0.3 else "") + digits)
    getcontext().prec = 60
    for v in values[:5_000]:
        if 1e-300 < abs(v) < 1e300:
            halfway = Decimal(v) + Decimal(math.ulp(v)) / 2
            texts += [format(halfway, f".{p - 1}e") for p in (16, 17, 18, 19, 20, 40)]
    texts += ["0", "-0", "0.0", "-0.0", "0e5", "1e-400", "1e400", "-1e400", "4.9e-324", "2.2250738585072011e-308",
              "2.2250738585072014e-308", "1.7976931348623157e308", "9007199254740993", "18446744073709551615",
              "123456789012345678901234567890", "0.1", "1e23", "8.41e21", "1448997445238699"]
    return texts


@pytest.mark.parametrize("seed", [0, 1])
def test_every_number_is_the_double_python_reads(seed):
    texts = _number_texts(seed)
    image_id, category_id, bbox, score = _columns(_document(texts))
    expected = np.array([float(json.loads(t)) for t in texts])  # an integer literal is an int first: "-0" is 0
    mismatched = np.flatnonzero(score.view(np.uint64) != expected.view(np.uint64))
    assert mismatched.size == 0, [(texts[i], score[i], expected[i]) for i in mismatched[:5]]
    np.testing.assert_array_equal(bbox.view(np.uint64), np.repeat(expected, 4).reshape(-1, 4).view(np.uint64))
    np.testing.assert_array_equal(image_id, np.arange(len(texts)))
    np.testing.assert_array_equal(category_id, np.arange(len(texts)) % 7)


def test_a_file_as_json_and_msgspec_write_it_gives_msgspecs_columns():
    rng = np.random.default_rng(3)
    entries = [{"image_id": int(i), "category_id": int(c), "bbox": b, "score": s, "area": 1.5, "iscrowd": 0,
                "extra": {"nested": [1, "two", None, True, False, {"x": 'tab\t quote" backslash\\'}]}}
               for i, c, b, s in zip(rng.integers(-(2**63), 2**63 - 1, 500).tolist(), rng.integers(0, 90, 500).tolist(),
                                     rng.uniform(-5, 2000, (500, 4)).tolist(), rng.random(500).tolist())]
    entries[0]["image_id"], entries[1]["image_id"] = 2**63 - 1, -(2**63)
    for text in (json.dumps(entries), json.dumps(entries, indent=2), msgspec.json.encode(entries).decode(),
                 json.dumps([{k: e[k] for k in reversed(list(e))} for e in entries])):
        got = _columns(text)
        assert got is not None
        decoded = msgspec.json.decode(text)
        np.testing.assert_array_equal(got[0], [e["image_id"] for e in decoded])
        np.testing.assert_array_equal(got[1], [e["category_id"] for e in decoded])
        np.testing.assert_array_equal(got[2].view(np.uint64), np.array([e["bbox"] for e in decoded]).view(np.uint64))
        np.testing.assert_array_equal(got[3].view(np.uint64), np.array([e["score"] for e in decoded]).view(np.uint64))
    assert [len(c) for c in _columns(" [ ] \n")] == [0, 0, 0, 0]


ENTRY = '{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5}'


@pytest.mark.parametrize("text", [
    "",
    "{}",
    f"[{ENTRY},]",
    f"[{ENTRY}",
    f"[{ENTRY}] x",
    "[{}]",
    '[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4]}]',  # no score
    '[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3], "score": 0.5}]',
    '[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4, 5], "score": 0.5}]',
    '[{"image_id": 1, "image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5}]',
    '[{"image_id": 1.0, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5}]',
    '[{"image_id": 1e2, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5}]',
    '[{"image_id": 9223372036854775808, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5}]',
    '[{"image_id": "1", "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5}]',
    '[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": null}]',
    '[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": true}]',
    '[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": NaN}]',
    '[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": Infinity}]',
    '[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5, "segmentation": null}]',
    '[{"image_\\u0069d": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5}]',
    '[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5, "note": "caf\u00e9"}]',
    '[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5, "note": "a\\qb"}]',
    '[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5, "note": [1, 2}]',
    '[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5, "note": tru}]',
    '[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": 0.5, "note": ' + "[" * 100 + "]" * 100 + "}]",
] + [f'[{{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3, 4], "score": {bad}}}]'
     for bad in ("01", "1.", ".5", "-", "+1", "1e", "1e+", "1.e5", "--1", "0x10", "1_0")])
def test_anything_else_is_left_to_the_general_readers(text):
    assert _columns(text) is None


def test_the_reader_declines_what_msgspec_rejects_and_read_detections_words_it(tmp_path):
    path = tmp_path / "dets.json"
    path.write_text('[{"image_id": 1, "category_id": 2, "bbox": [1, 2, 3], "score": 0.5}]')
    with pytest.raises(results.DataError, match=r"dets\.json.*detection 0.*bbox"):
        results.read_detections(path)


def test_without_the_compiled_reader_msgspec_reads_the_same_columns(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    entries = [{"image_id": int(i), "category_id": 3, "bbox": b, "score": s}
               for i, b, s in zip(rng.integers(1, 50, 300).tolist(), rng.uniform(0, 900, (300, 4)).tolist(),
                                  rng.random(300).tolist())]
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(entries))
    compiled = results.read_detections(path)
    monkeypatch.setattr(results, "read_columns", None)
    general = results.read_detections(path)
    for field in ("image_id", "category_id", "bbox", "score"):
        np.testing.assert_array_equal(getattr(compiled, field), getattr(general, field))
    np.testing.assert_array_equal(compiled.bbox, [e["bbox"] for e in entries])


def test_whatever_the_reader_accepts_msgspec_decodes_to_the_same_columns():
    """Single-byte changes of a small file (a digit, a bracket, a quote, a letter...): each result is
    either declined or exactly what msgspec's typed decoder makes of the same bytes."""
    base = json.dumps([{"image_id": 12, "category_id": 3, "bbox": [1.5, 20, 3e2, 4.25], "score": 0.75,
                        "note": ["a", {"b": None}]}] * 2).encode()
    r = random.Random(0)
    accepted = 0
    for _ in range(3000):
        text = bytearray(base)
        text[r.randrange(len(text))] = r.choice(b'0123456789.-+eE[]{},:" \ntrufalsnx\x00')
        got = _columns(bytes(text))
        if got is None:
            continue
        accepted += 1
        entries = results._DECODER.decode(bytes(text))
        np.testing.assert_array_equal(got[0], [e.image_id for e in entries])
        np.testing.assert_array_equal(got[1], [e.category_id for e in entries])
        np.testing.assert_array_equal(got[2].view(np.uint64), np.array([e.bbox for e in entries]).view(np.uint64))
        np.testing.assert_array_equal(got[3].view(np.uint64), np.array([e.score for e in entries]).view(np.uint64))
    assert accepted > 300  # changed digits and whitespace are still results files
