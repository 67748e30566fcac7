import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from vision.data.image_io import list_images, read_image, read_image_header, read_image_size
from vision.errors import ImageReadError


def _pattern(h=24, w=40):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_roundtrip(tmp_path):
    rgb = _pattern()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = _pattern()[..., 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (*gray.shape, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_drops_alpha(tmp_path):
    rgba = np.dstack([_pattern(), np.full((24, 40), 7, np.uint8)])
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])


def test_16bit_png_is_scaled_to_8bit(tmp_path):
    values = np.array([[0, 256 * 100, 65535]], np.uint16).repeat(4, 0)
    cv2.imwrite(str(tmp_path / "deep.png"), values)  # 16-bit grayscale
    out = read_image(tmp_path / "deep.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255])


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg_is_decoded_upright(tmp_path, orientation):
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)  # left half red, so every rotation is distinguishable
    stored[:5, 20:] = (0, 0, 255)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"rot{orientation}.jpg"
    im.save(path, exif=exif.tobytes(), quality=100)
    with Image.open(path) as ref:
        expected = np.asarray(ImageOps.exif_transpose(ref).convert("RGB"))
    out = read_image(path)
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 2
    assert read_image_size(path) == (expected.shape[1], expected.shape[0])


def test_bad_files_raise_one_line_errors_naming_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(_pattern(64, 64)).save(good, quality=90)
    data = good.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    for name, problem in [
        ("truncated.jpg", "truncated JPEG"),
        ("empty.jpg", "empty file"),
        ("text.jpg", "not a readable image"),
        ("missing.jpg", "file not found"),
    ]:
        with pytest.raises(ImageReadError) as e:
            read_image(tmp_path / name)
        assert name in str(e.value) and problem in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(ImageReadError):
            read_image_header(tmp_path / name)
    assert read_image_header(good) == (64, 64)


def test_list_images_folder_glob_and_list_file(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.png", "a.jpg", "sub/c.JPG", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert [p.split("/")[-1] for p in list_images(tmp_path)] == ["a.jpg", "b.png", "c.JPG"]
    assert [p.split("/")[-1] for p in list_images(str(tmp_path / "*.png"))] == ["b.png"]
    (tmp_path / "list.txt").write_text("a.jpg\nsub/c.JPG\n")
    assert list_images(tmp_path / "list.txt") == [str(tmp_path / "a.jpg"), str(tmp_path / "sub/c.JPG")]
