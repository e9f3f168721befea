"""Image loading: what each unusual or broken file becomes (kept, converted to RGB JPEG, or skipped)."""

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from PIL import ImageFile
import pytest
import tensorflow as tf

from tfrecords.writing import images
from trainer.input import data

ODD_IMAGES_DIR = Path(__file__).resolve().parents[4] / "shared" / "data" / "odd_images"

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


# --- Transparency: the same pixels in conversion (training) and in the serving signature (prediction) --------

HIDDEN = (200, 30, 60)  # the colour under transparent pixels: a plain convert("RGB") or channels=3 decode shows it
SIZE = 32


def _png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 [height, width, channels] (Pillow cannot write 16-bit RGBA)."""
    height, width, channels = values.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\x00" + values[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _alpha() -> np.ndarray:
    """Opaque left half, transparent right half, a half-transparent band below the middle (aligned to JPEG's 16 px
    blocks, so the transparent top right block is plain white in the converted JPEG too)."""
    alpha = np.full((SIZE, SIZE), 255, np.uint8)
    alpha[:, SIZE // 2 :] = 0
    alpha[16:24, :] = 128
    return alpha


def _colours() -> np.ndarray:
    """Smooth colours (little JPEG noise), the hidden colour under the transparent half."""
    ramp = np.linspace(20, 235, SIZE).astype(np.uint8)
    rgb = np.stack([np.tile(ramp, (SIZE, 1)), np.tile(ramp[:, None], (1, SIZE)), np.full((SIZE, SIZE), 90, np.uint8)], -1)
    rgb[:, SIZE // 2 :] = HIDDEN
    return rgb


def _transparent_file(kind: str) -> bytes:
    rgb, alpha = _colours(), _alpha()
    if kind == "rgba":
        return _encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "PNG")
    if kind == "webp_rgba":
        return _encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "WEBP", lossless=True, exact=True)
    if kind == "gray_alpha":
        return _encode(Image.fromarray(np.dstack([rgb[..., 1], alpha]), "LA"), "PNG")
    if kind == "rgba_16_bit":
        return _png16(np.dstack([rgb, alpha]).astype(np.uint16) * 257)
    if kind == "rgb_colour_key":  # tRNS naming one RGB colour transparent
        return _encode(Image.fromarray(rgb), "PNG", transparency=HIDDEN)
    # A palette PNG whose tRNS gives each palette entry its alpha.
    palette_image = Image.fromarray(rgb).quantize(colors=64, dither=Image.Dither.NONE)
    entries = len(palette_image.getpalette()) // 3
    hidden_index = palette_image.getpixel((SIZE - 1, 0))
    alphas = bytes(0 if index == hidden_index else 255 for index in range(entries))
    return _encode(palette_image, "PNG", transparency=alphas)


def _serving_pixels(encoded: bytes) -> np.ndarray:
    """What the SavedModel's serving signature (and predict's TFLite and ONNX paths) feed the model: here
    uncropped and at the file's own size, so the pixels are the decoded ones."""
    return data.decode_and_resize(tf.constant(encoded), SIZE, crop_fraction=1.0, dct_scale=False).numpy()


TRANSPARENT_KINDS = ["rgba", "webp_rgba", "gray_alpha", "rgba_16_bit", "rgb_colour_key", "palette_alpha"]


@pytest.mark.parametrize("kind", TRANSPARENT_KINDS)
def test_transparent_pixels_are_the_same_white_in_conversion_and_in_serving(kind):
    # Before: the converter put transparent pixels on white, the serving decode showed the colour hidden under
    # them (HIDDEN, or black): one image, two inputs.
    encoded = _transparent_file(kind)
    served = _serving_pixels(encoded)
    np.testing.assert_array_equal(served[:16, -16:], 255.0)  # transparent: white, as the converter makes it
    # Exactly the pixels the converter encodes as JPEG (its RGB conversion, before the JPEG's rounding).
    rgba = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGBA"))
    assert rgba[0, -1, 3] == 0 and not np.array_equal(rgba[0, -1, :3], [255, 255, 255])
    stored = np.asarray(images._to_rgb(Image.open(io.BytesIO(encoded))))
    np.testing.assert_array_equal(served, stored.astype(np.float32))
    # And within JPEG noise of what training reads back from the stored file.
    converted = _serving_pixels(images.load_image(encoded)[0])
    assert np.abs(converted - served).mean() < 4 and np.abs(converted[:16, -16:] - 255).max() < 16


def test_composite_on_white_is_pillows_alpha_composite_for_every_colour_and_alpha():
    colour, alpha = np.meshgrid(np.arange(256), np.arange(256))
    rgba = np.stack([colour, colour, colour, alpha], -1).astype(np.uint8)
    background = Image.new("RGBA", (256, 256), images.BACKGROUND_COLOR)
    background.alpha_composite(Image.fromarray(rgba, "RGBA"))
    expected = np.asarray(background.convert("RGB")).astype(np.int32)
    np.testing.assert_array_equal(images.composite_on_white(rgba[..., :3].astype(np.int32), alpha[..., None]), expected)
    in_graph = images.composite_on_white(tf.constant(rgba[..., :3], tf.int32), tf.constant(alpha[..., None], tf.int32))
    np.testing.assert_array_equal(in_graph.numpy(), expected)


@pytest.mark.skipif(not ODD_IMAGES_DIR.is_dir(), reason=f"{ODD_IMAGES_DIR} is absent")
@pytest.mark.parametrize("file_name", sorted(name for name, kind in ODD_IMAGES.items()
                                             if kind == CONVERTED and name.endswith(".png")))
def test_odd_pngs_are_served_as_converted(file_name):
    # Real 16-bit, grayscale+alpha and palette+transparency files (animated: the first frame, both ways).
    encoded = (ODD_IMAGES_DIR / file_name).read_bytes()
    rgba = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGBA")).astype(np.int32)
    stored = images.composite_on_white(rgba[..., :3], rgba[..., 3:])
    height, width = stored.shape[:2]
    served = data.decode_and_resize(tf.constant(encoded), max(height, width), crop_fraction=1.0, dct_scale=False)
    # Compare at the file's own size: resize the stored pixels the same way.
    expected = data.resize_pixels(tf.constant(stored.astype(np.uint8)), max(height, width)).numpy()
    np.testing.assert_allclose(served.numpy(), expected, atol=1e-3)
