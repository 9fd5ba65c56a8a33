import hashlib
import struct
import zlib

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from extract.layout import ImageFile
from extract.reader import INTERPOLATIONS, decode, load, load_all
from extract.sources.folder import Folder


def keras_pixels(path, size, interpolation):
    """The reference: what plain Keras feeds a network for this file."""
    image = keras.utils.load_img(path, target_size=(size, size), interpolation=interpolation)
    return keras.utils.img_to_array(image)


def image_file(path: str) -> ImageFile:
    return ImageFile(path, "", "unlabeled", 0, 0)


@pytest.mark.parametrize("interpolation", sorted(INTERPOLATIONS))
@pytest.mark.parametrize("size", [32, 57])
def test_pixels_equal_keras_load_img(tmp_path, interpolation, size):
    path = make_image(tmp_path / "a.png", seed=3, size=(70, 45))
    pixels = decode(path.read_bytes(), size, interpolation)
    assert pixels.dtype == np.uint8 and pixels.shape == (size, size, 3)
    np.testing.assert_array_equal(pixels, keras_pixels(path, size, interpolation))


@pytest.mark.parametrize(
    "name, mode, format",
    [
        ("rgb.jpg", "RGB", None),
        ("gray.png", "L", None),
        ("palette.gif", "P", None),
        ("rgba.png", "RGBA", None),
        ("cmyk.jpg", "CMYK", None),
        ("image.bmp", "RGB", None),
        ("image.tiff", "RGB", None),
        ("webp-named.jpeg", "RGB", "WEBP"),  # recognised by content, not by name
    ],
)
def test_every_mode_and_format_matches_keras(tmp_path, name, mode, format):
    path = make_image(tmp_path / name, seed=5, size=(48, 36), mode=mode, format=format)
    np.testing.assert_array_equal(decode(path.read_bytes(), 32, "bilinear"), keras_pixels(path, 32, "bilinear"))


def test_image_already_at_size_is_not_resampled(tmp_path):
    path = make_image(tmp_path / "a.png", size=(32, 32))
    np.testing.assert_array_equal(decode(path.read_bytes(), 32), np.asarray(Image.open(path)))


def test_animated_gif_uses_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), color) for color in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    pixels = decode(path.read_bytes(), 32)
    assert tuple(pixels[0, 0]) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    upright = make_image(tmp_path / "upright.png", seed=9, size=(60, 40))
    stored = Image.open(upright).transpose(Image.Transpose.ROTATE_90)  # what a camera writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated = tmp_path / "rotated.png"
    stored.save(rotated, exif=exif)
    np.testing.assert_array_equal(decode(rotated.read_bytes(), 32), keras_pixels(upright, 32, "bilinear"))


def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path):
    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # up to 65472
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    pixels = decode(path.read_bytes(), 32)
    np.testing.assert_array_equal(pixels[..., 0], values >> 8)
    assert pixels.max() == 255 and (pixels == 255).mean() < 0.01  # Keras would give 99% white


def bomb_png() -> bytes:
    """A PNG whose header claims 20000 x 20000 pixels (the data never comes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"this is text, not a picture", "not an image Pillow can read"),
        ("truncated", "truncated image"),
        ("bomb", "decompression bomb"),
    ],
)
def test_broken_files_become_failures(tmp_path, content, reason):
    if content == "truncated":
        whole = make_image(tmp_path / "whole.jpg", size=(64, 64)).read_bytes()
        content = whole[: len(whole) // 2]
    elif content == "bomb":
        content = bomb_png()
    (tmp_path / "bad.jpg").write_bytes(content)
    loaded = load(Folder(tmp_path), image_file("bad.jpg"), 32, "bilinear")
    assert loaded.pixels is None
    assert reason in loaded.error
    assert loaded.sha256 == hashlib.sha256(content).hexdigest()


def test_unreadable_path_is_a_failure(tmp_path):
    loaded = load(Folder(tmp_path), image_file("missing.png"), 32, "bilinear")
    assert loaded.error.startswith("cannot read file") and loaded.sha256 is None


def test_known_content_is_hashed_but_not_decoded(tmp_path):
    path = make_image(tmp_path / "a.png")
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load(Folder(tmp_path), image_file("a.png"), 32, "bilinear", known={sha256})
    assert loaded.sha256 == sha256 and loaded.pixels is None and loaded.error is None


def test_load_all_keeps_input_order_and_survives_failures(tmp_path):
    names = []
    for i in range(30):
        if i % 7 == 3:
            (tmp_path / f"{i}.png").write_bytes(b"junk")
        else:
            make_image(tmp_path / f"{i}.png", seed=i)
        names.append(f"{i}.png")
    results = list(load_all(Folder(tmp_path), map(image_file, names), 32, "nearest", workers=3, prefetch=4))
    assert [result.image.path for result in results] == names
    assert [result.error is not None for result in results] == [i % 7 == 3 for i in range(30)]


def test_draft_decoding_shrinks_large_jpegs_while_decoding(tmp_path):
    photo = make_image(tmp_path / "big.jpg", size=(400, 300))
    exact = decode(photo.read_bytes(), 64)
    draft = decode(photo.read_bytes(), 64, draft=True)
    assert draft.shape == exact.shape == (64, 64, 3) and draft.dtype == np.uint8
    difference = np.abs(draft.astype(int) - exact)
    assert 0 < difference.mean() < 10  # the same picture (random 5-pixel blocks: edges everywhere), not the same pixels
    png = make_image(tmp_path / "big.png", size=(400, 300))
    np.testing.assert_array_equal(decode(png.read_bytes(), 64, draft=True), decode(png.read_bytes(), 64))
