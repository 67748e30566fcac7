"""Pixel limits and decoder errors: every way an image is read turns a huge or broken file into one
ImageReadError naming it, before anything image-sized is allocated.

The huge files are cheap: a PNG or JPEG header declaring the size, with a few bytes of pixel data.
That is all a header check needs, and OpenCV's own limit (CV_IO_MAX_IMAGE_PIXELS, 2^30) is also
checked from the header, so it fires on these files as it does on a real 1.6-gigapixel PNG.
"""

import io
import logging
import struct
import subprocess
import sys
import warnings
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from vision.data import image_io
from vision.data.build import drop_unreadable_images
from vision.data.classification import ClassificationSet, ClassSample, drop_unreadable_samples
from vision.data.image_io import (
    decode_image,
    list_images,
    read_image,
    read_image_header,
    read_image_size,
    read_image_unchanged,
    set_max_image_pixels,
)
from vision.data.records import Categories, DetectionSet, ImageRecord
from vision.data.semantic import SemanticItem, SemanticSet, validate_set
from vision.data.yolo import read_yolo
from vision.errors import DataError, ImageReadError

from tests.helpers.images import jpeg_declaring, png_header


@pytest.fixture(autouse=True)
def _default_limit(monkeypatch):
    """Each test starts from the default limit and leaves the process (and PIL) as it found them."""
    monkeypatch.setattr(image_io, "MAX_IMAGE_PIXELS", image_io.DEFAULT_MAX_IMAGE_PIXELS)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.delenv(image_io.LIMIT_ENV, raising=False)


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if OpenCV is asked to decode: over-limit files must be refused from the header."""
    def refuse(*args, **kwargs):
        raise AssertionError("cv2.imdecode called for an image over the pixel limit")
    monkeypatch.setattr(cv2, "imdecode", refuse)


@pytest.mark.parametrize(("width", "height"), [(40000, 40000), (20000, 20000), (13400, 13400)])
def test_huge_png_is_refused_from_its_header_by_every_reader(tmp_path, no_decoding, width, height):
    # 1.6 gigapixels (OpenCV's own limit), 0.4 (4.8 GB decoded as RGB) and just over the default.
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(width, height, color_type=2))
    for read in (read_image, read_image_header, read_image_size, read_image_unchanged):
        with pytest.raises(ImageReadError) as e:
            read(path)
        message = str(e.value)
        assert message.startswith(f"{path}: image is {width}x{height} ({width * height} pixels), over the limit")
        assert "VISION_MAX_IMAGE_PIXELS" in message and "\n" not in message
    with pytest.raises(ImageReadError, match="over the limit"):
        decode_image(path.read_bytes(), path)


def test_pil_bomb_warning_is_no_error_even_when_warnings_are_errors(tmp_path):
    # Between PIL's warning and error thresholds: with warnings as errors, PIL's DecompressionBombWarning
    # used to escape read_image_size as an exception of its own.
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_declaring(10000, 10000))
    assert Image.MAX_IMAGE_PIXELS < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS  # PIL warns, does not refuse
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image_header(path) == (10000, 10000)


def test_jpeg_limit_follows_the_setting_and_reaches_new_processes(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_declaring(12000, 12000))
    assert read_image_size(path) == (12000, 12000)  # 144 Mpx: under the generous default
    set_max_image_pixels(100_000_000)
    with pytest.raises(ImageReadError, match=r"image is 12000x12000 \(144000000 pixels\), over the limit of 100000000"):
        read_image(path)
    # a process started now (a loader or prediction worker) reads the limit from the environment
    code = ("import sys; from vision.data.image_io import read_image_size\n"
            "from vision.errors import ImageReadError\n"
            "try: read_image_size(sys.argv[1])\nexcept ImageReadError as e: print(e)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    assert "over the limit of 100000000 pixels" in out


def test_a_raised_limit_lets_past_pil_and_opencv_errors_are_image_read_errors(tmp_path):
    path = tmp_path / "huge.jpg"
    path.write_bytes(jpeg_declaring(40000, 40000))
    set_max_image_pixels(2_000_000_000)
    assert read_image_size(path) == (40000, 40000)  # PIL alone refuses anything over 179 Mpx
    with pytest.raises(ImageReadError) as e:
        read_image(path)  # now OpenCV's own 2^30 limit fires: cv2.error before the fix
    assert str(e.value).startswith(f"{path}: cannot decode image (OpenCV") and "\n" not in str(e.value)


def test_bad_limit_setting_is_a_config_error(monkeypatch, tmp_path):
    from vision.errors import ConfigError

    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path)
    monkeypatch.setattr(image_io, "MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ConfigError, match="VISION_MAX_IMAGE_PIXELS='lots'"):
        read_image(path)
    with pytest.raises(ConfigError):
        set_max_image_pixels(0)
    for raw, expected in [("none", None), ("5e8", 500_000_000), ("12", 12), ("", 178_956_970), ("-3", "-3")]:
        monkeypatch.setenv(image_io.LIMIT_ENV, raw)
        assert image_io._limit_from_env() == expected


def test_limit_applies_and_normal_images_still_decode(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)
    set_max_image_pixels(30 * 50)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)  # exactly at the limit
    set_max_image_pixels(30 * 50 - 1)
    with pytest.raises(ImageReadError, match=r"image is 50x30 \(1500 pixels\), over the limit of 1499"):
        read_image(tmp_path / "a.png")


def test_damaged_header_fields_are_image_read_errors(tmp_path):
    # A PNG whose IHDR declares a zero width: PIL raises SyntaxError/ValueError-like errors inside
    path = tmp_path / "zero.png"
    path.write_bytes(png_header(0, 10))
    for read in (read_image, read_image_header, read_image_size):
        with pytest.raises(ImageReadError) as e:
            read(path)
        assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_image_list_that_is_not_text_is_an_image_read_error(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ImageReadError, match=r"list\.txt: cannot read the image list"):
        list_images(lst)


def _record(path, w, h, image_id):
    return ImageRecord(image_id, path.name, str(path), w, h)


def test_training_sets_skip_over_limit_images_instead_of_a_traceback(tmp_path, caplog):
    # DecompressionBombError used to escape the header check that runs before training.
    good, huge = tmp_path / "good.png", tmp_path / "huge.png"
    Image.new("RGB", (8, 6)).save(good)
    huge.write_bytes(png_header(20000, 20000))
    det_set = DetectionSet(Categories.from_names(["x"]), [_record(good, 8, 6, 1), _record(huge, 20000, 20000, 2)])
    with caplog.at_level(logging.WARNING):
        drop_unreadable_images(det_set)
    assert [r.image_id for r in det_set.records] == [1]
    assert len(det_set.skipped_images) == 1 and "huge.png: image is 20000x20000" in det_set.skipped_images[0]
    cls_set = ClassificationSet(Categories.from_names(["x"]), [ClassSample(str(good), (0,)), ClassSample(str(huge), (0,))])
    drop_unreadable_samples(cls_set)
    assert [s.path for s in cls_set.samples] == [str(good)] and "over the limit" in cls_set.skipped_images[0]
    sem_set = SemanticSet(Categories.from_names(["x"]), [SemanticItem(1, str(good)), SemanticItem(2, str(huge))])
    validate_set(sem_set)
    assert [i.path for i in sem_set.items] == [str(good)] and "over the limit" in sem_set.skipped_images[0]


def test_yolo_reader_skips_over_limit_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "huge.png").write_bytes(png_header(40000, 40000))
    ds = read_yolo(tmp_path / "labels", tmp_path / "images", ["x"])
    assert len(ds) == 1 and "huge.png: image is 40000x40000" in ds.skipped_images[0]


def test_over_limit_mask_is_a_data_error_naming_the_mask(tmp_path):
    from vision.data.semantic import _read_mask_file

    mask = tmp_path / "m.png"
    mask.write_bytes(png_header(40000, 40000))
    with pytest.raises(DataError) as e:
        _read_mask_file(str(mask))
    assert not isinstance(e.value, ImageReadError)  # a bad mask stops the run, it is not skipped
    assert str(e.value).startswith(f"{mask}: not a readable mask image (image is 40000x40000")


def _encoded(fmt: str, size=(37, 23), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, fmt, **save)
    return buf.getvalue()


def test_fast_header_sizes_match_pil(shared_data, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL as the reference, on the huge headers too
    exif = Image.Exif()
    exif[0x0112] = 6
    samples = [
        _encoded("JPEG"), _encoded("JPEG", progressive=True), _encoded("JPEG", exif=exif.tobytes()),
        _encoded("JPEG", (640, 1), icc_profile=b"\x00" * 5000), _encoded("JPEG", mode="L", size=(1, 999)),
        _encoded("PNG"), _encoded("PNG", mode="RGBA"), _encoded("PNG", mode="I;16", size=(300, 2)),
        jpeg_declaring(65535, 65535), png_header(40000, 3),
    ]
    real = sorted(shared_data.glob("bccd/JPEGImages/*.jpg"))[:20] + sorted(shared_data.glob("raccoon/**/*.jp*g"))[:40]
    samples += [p.read_bytes() for p in real]
    for data in samples:
        with Image.open(io.BytesIO(data)) as im:
            assert image_io._png_or_jpeg_size(data) == im.size
    assert image_io._png_or_jpeg_size(_encoded("BMP")) is None  # other formats go through PIL
