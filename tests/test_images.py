"""Image loading: what each unusual or broken file becomes (kept, converted to RGB JPEG, or skipped)."""

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image
from PIL import ImageFile
import pytest
import tensorflow as tf

from tfrecords import images

ODD_IMAGES_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "odd_images"

KEPT = "kept"  # an RGB JPEG without EXIF rotation: stored byte for byte
CONVERTED = "converted"  # decoded, made upright 8-bit RGB, re-encoded as JPEG

# What each file in ../shared/data/odd_images must become. A string other than KEPT/CONVERTED is the
# start of the reason the file is skipped with.
ODD_IMAGES = {
    "hopper.jpg": KEPT,
    "hopper_16bit_qtables.jpg": KEPT,  # 16-bit quantisation tables, 8-bit pixels: a valid RGB JPEG
    "invalid-exif.jpg": KEPT,  # broken EXIF does not make the pixels unusable
    "photoshop-200dpi-broken.jpg": KEPT,  # odd header bytes, but every pixel decodes (TF too)
    "truncated_app14.jpg": KEPT,  # truncated APP14 marker, pixels intact (TF decodes it too)
    "hopper.png": CONVERTED,
    "hopper_gray.jpg": CONVERTED,  # grayscale (L) -> RGB
    "hopper_orientation_3.jpg": CONVERTED,  # EXIF orientation 3 -> rotated upright
    "pil_sample_cmyk.jpg": CONVERTED,  # CMYK -> RGB
    "uncompressed_l.png": CONVERTED,  # grayscale PNG
    "apng_mode_16bit.png": CONVERTED,  # animated 16-bit RGBA: first frame, on white
    "apng_mode_grayscale_alpha.png": CONVERTED,  # animated LA
    "apng_mode_palette_alpha.png": CONVERTED,  # animated palette with transparency
    "broken.png": "not an image",
    "LICENSE_Pillow_HPND.txt": "not an image",
    "broken_data_stream.png": "truncated or corrupt image",
    "truncated_end_chunk.png": "truncated or corrupt image",
    "truncated_image.png": "truncated or corrupt image",
    "truncated_jpeg.jpg": "truncated or corrupt image",
}


def _encode(image: Image.Image, image_format: str, **options) -> bytes:
    output = io.BytesIO()
    image.save(output, format=image_format, **options)
    return output.getvalue()


def _rgb_jpeg(width: int = 48, height: int = 32) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), "JPEG", quality=90)


def _first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _decode_with_tensorflow(jpeg_bytes: bytes) -> np.ndarray:
    return tf.io.decode_jpeg(jpeg_bytes, channels=3).numpy()


@pytest.mark.skipif(not ODD_IMAGES_DIR.is_dir(), reason=f"{ODD_IMAGES_DIR} is absent")
@pytest.mark.parametrize("file_name, expected", sorted(ODD_IMAGES.items()))
def test_odd_images(file_name, expected):
    data = (ODD_IMAGES_DIR / file_name).read_bytes()
    if expected not in (KEPT, CONVERTED):
        with pytest.raises(images.ImageError, match=f"^{re.escape(expected)}"):
            images.load_image(data)
        return
    encoded, height, width = images.load_image(data)
    assert (encoded == data) == (expected == KEPT)
    pixels = _decode_with_tensorflow(encoded)
    assert pixels.shape == (height, width, 3)


@pytest.mark.skipif(not ODD_IMAGES_DIR.is_dir(), reason=f"{ODD_IMAGES_DIR} is absent")
def test_exif_orientation_is_applied():
    upright = _decode_with_tensorflow((ODD_IMAGES_DIR / "hopper.jpg").read_bytes()).astype(float)
    encoded, _, _ = images.load_image((ODD_IMAGES_DIR / "hopper_orientation_3.jpg").read_bytes())
    rotated_back = _decode_with_tensorflow(encoded).astype(float)
    # Same picture up to JPEG noise once rotated; without the rotation it would differ a lot.
    assert np.abs(rotated_back - upright).mean() < 10
    assert np.abs(np.rot90(rotated_back, 2) - upright).mean() > 30


def test_rgb_jpeg_is_kept_byte_for_byte():
    data = _rgb_jpeg(width=48, height=32)
    assert images.load_image(data) == (data, 32, 48)


def test_jpeg_quality_applies_to_re_encoded_images_only():
    kept = _rgb_jpeg(width=48, height=32)
    assert images.load_image(kept, jpeg_quality=50)[0] == kept
    photo = _encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 96, 3), np.uint8)), "PNG")
    sizes = {quality: len(images.load_image(photo, jpeg_quality=quality)[0]) for quality in (50, 90, 95)}
    assert sizes[50] < sizes[90] < sizes[95]
    assert images.load_image(photo)[0] == images.load_image(photo, jpeg_quality=images.DEFAULT_JPEG_QUALITY)[0]


def test_png_named_jpg_is_converted():
    # The name does not matter: the format comes from the bytes.
    data = _encode(Image.new("RGB", (40, 30), (10, 200, 30)), "PNG")
    encoded, height, width = images.load_image(data)
    assert (height, width) == (30, 40)
    assert encoded[:2] == b"\xff\xd8"  # JPEG start-of-image marker
    assert np.abs(_decode_with_tensorflow(encoded)[15, 20].astype(int) - [10, 200, 30]).max() < 8


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 16, 32))
    encoded, _, _ = images.load_image(_encode(image, "PNG"))
    pixels = _decode_with_tensorflow(encoded).astype(int)
    assert np.abs(pixels[16, 4] - [255, 0, 0]).max() < 8
    assert np.abs(pixels[16, 28] - [255, 255, 255]).max() < 8


def test_16_bit_grayscale_is_scaled_not_clipped():
    pixels = np.full((32, 32), 32768, dtype=np.uint16)  # half of the 16-bit range
    encoded, _, _ = images.load_image(_encode(Image.fromarray(pixels), "PNG"))
    assert np.abs(_decode_with_tensorflow(encoded).astype(int) - 128).max() < 3


def test_palette_gif_is_converted():
    image = Image.new("P", (32, 32), 3)
    encoded, height, width = images.load_image(_encode(image, "GIF"))
    assert _decode_with_tensorflow(encoded).shape == (32, 32, 3) == (height, width, 3)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is a text file named photo.jpg\n", "not an image (unrecognised format)"),
        (_first_half(_rgb_jpeg(width=64, height=64)), "truncated or corrupt image: "),
    ],
    ids=["zero_bytes", "text_named_jpg", "jpeg_cut_in_half"],
)
def test_unusable_files_raise_image_error(data, reason):
    with pytest.raises(images.ImageError, match=f"^{re.escape(reason)}"):
        images.load_image(data)


def test_image_error_is_a_value_error():
    assert issubclass(images.ImageError, ValueError)


def test_refuses_to_run_when_truncated_images_are_allowed(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        images.load_image(_rgb_jpeg())
