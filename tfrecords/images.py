"""Turns the bytes of any image file into JPEG bytes that TensorFlow can decode, or says why not.

An RGB JPEG without EXIF rotation is stored as it came (no quality loss, no time spent). Everything else
(PNG, GIF, BMP, WebP, TIFF, grayscale, 16-bit, palette, CMYK, EXIF-rotated, with alpha) is decoded,
rotated upright, converted to 8-bit RGB and re-encoded as JPEG, so the trainer needs one decoder only.
Animated images keep their first frame.
"""

import io
import struct

from PIL import Image
from PIL import ImageFile
from PIL import ImageOps
from PIL import UnidentifiedImageError

JPEG_QUALITY = 95
BACKGROUND_COLOR = (255, 255, 255, 255)
EXIF_ORIENTATION_TAG = 0x0112

# What Pillow raises on malformed input (its fuzzing tests accept the same set). UnidentifiedImageError
# is an OSError; DecompressionBombError is none of these, so it is listed.
PILLOW_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    struct.error,
    Image.DecompressionBombError,
)


class ImageError(ValueError):
    """A file that cannot be used as an image; the message is a short reason for the skipped list."""


def load_image(data: bytes) -> tuple[bytes, int, int]:
    """Decodes an image file fully and returns it as JPEG.

    Args:
        data: the bytes of the file, in any format Pillow reads.

    Returns:
        (jpeg_bytes, height, width) of the upright 8-bit RGB image.

    Raises:
        ImageError: the file is empty, not an image, truncated, corrupt or too large.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some other module switched this global on; with it, truncated files would decode as grey.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True, so truncated images would pass silently; "
            "set it back to False before converting"
        )
    if not data:
        raise ImageError("empty file")
    try:
        image = Image.open(io.BytesIO(data))
        # open() reads only the header and verify() passes truncated JPEGs: load() decodes every pixel.
        image.load()
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"image too large: {error}") from None
    except PILLOW_ERRORS as error:
        raise ImageError(f"truncated or corrupt image: {error}") from None

    # Read EXIF only after load(): on some broken PNGs getexif() first hides the error load() raises.
    orientation = _exif_orientation(image)
    if image.format == "JPEG" and image.mode == "RGB" and orientation in (None, 1):
        return data, image.height, image.width

    try:
        if orientation not in (None, 1):
            image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
        output = io.BytesIO()
        image.save(output, format="JPEG", quality=JPEG_QUALITY)
    except PILLOW_ERRORS as error:
        raise ImageError(f"cannot convert image to RGB JPEG: {error}") from None
    return output.getvalue(), image.height, image.width


def _exif_orientation(image: Image.Image):
    """Returns the EXIF orientation (1 to 8), or None when absent or unreadable."""
    try:
        return image.getexif().get(EXIF_ORIENTATION_TAG)
    except PILLOW_ERRORS:
        # Broken EXIF does not make the pixels unusable: keep the image as stored.
        return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any mode to 8-bit RGB; transparent pixels become white."""
    if image.mode.startswith("I"):
        # 16-bit ("I;16") and 32-bit ("I") integer images: convert() clips values above 255 instead of
        # scaling them, which would turn a 16-bit image almost white. Assume a 16-bit range.
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    # A plain convert("RGB") drops alpha and shows whatever colour hides under transparent pixels
    # (often black); white is what an image viewer shows.
    foreground = image.convert("RGBA")
    background = Image.new("RGBA", foreground.size, BACKGROUND_COLOR)
    background.alpha_composite(foreground)
    return background.convert("RGB")
