"""Turns the bytes of any image file into JPEG bytes that TensorFlow can decode, or says why not.

The format comes from the bytes, never from the file name. Accepted: JPEG, PNG, GIF, BMP and WebP; any
other format Pillow recognises (TIFF, ICO, ...) is skipped as "unsupported format".

An RGB JPEG without EXIF rotation and within `max_side` is stored as it came (no quality loss), after a
full decode that proves every pixel is there. Everything else (PNG, GIF, BMP, WebP, grayscale, 16-bit,
palette, CMYK/YCCK, EXIF-rotated, with alpha, larger than `max_side`) is decoded, rotated upright,
converted to 8-bit RGB, downscaled if needed and re-encoded as JPEG, so the trainer needs one decoder.
Animated images keep their first frame. Transparent pixels are composited on white, exactly as
composite_on_white computes it: the formula the serving signature applies in its graph (trainer.input.data), so a file
gets the same pixels in training and in serving.

Speed: JPEG decoders can scale by 1/2, 1/4 or 1/8 while decoding (Pillow's `Image.draft()`). A kept
JPEG is validated at 1/8 scale, and a JPEG to be downscaled is decoded at the smallest such scale that
is still at least the target size. Every block of the file is still entropy-decoded either way, so
truncated or corrupt files fail exactly as with a full-size decode.
"""

import io
import struct

from PIL import Image
from PIL import ImageFile
from PIL import ImageOps
from PIL import UnidentifiedImageError

# Quality of re-encoded JPEGs (kept JPEGs are stored as they came). 90, as FFCV's writer: against 95 the
# files are 30% smaller and decode about 1.2x faster (libjpeg's entropy decoding dominates, and it scales
# with the bits), at 1.6 dB PSNR less; with 4:2:0 chroma both are far below the source anyway.
DEFAULT_JPEG_QUALITY = 90
BACKGROUND_COLOR = (255, 255, 255, 255)
EXIF_ORIENTATION_TAG = 0x0112
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
# EXIF orientations 5 to 8 swap width and height.
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)

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


def load_image(
    data: bytes, max_side: int | None = None, jpeg_quality: int = DEFAULT_JPEG_QUALITY
) -> tuple[bytes, int, int]:
    """Decodes an image file fully and returns it as an upright RGB JPEG.

    Args:
        data: the bytes of the file.
        max_side: if set, images whose longer side exceeds it are downscaled (aspect kept) so that the
            longer side is max_side.
        jpeg_quality: JPEG quality (1-95) of images that are re-encoded.

    Returns:
        (jpeg_bytes, height, width) of the stored image.

    Raises:
        ImageError: the file is empty, not an image, of an unsupported format, truncated, corrupt or
            too large to decode safely.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some other module switched this global on; with it, truncated files would decode as grey.
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True, so truncated images would pass silently; "
            "set it back to False before converting"
        )
    image = _open(data)
    width, height = image.size
    target_size = _target_size(width=width, height=height, max_side=max_side)
    # JPEG headers carry EXIF, so the header alone says whether the file is kept; then a 1/8-scale
    # decode validates it.
    keep_bytes = (
        image.format == "JPEG"
        and image.mode == "RGB"
        and target_size is None
        and _exif_orientation(image) in (None, 1)
    )
    try:
        if image.format == "JPEG":
            draft_size = (max(1, width // 8), max(1, height // 8)) if keep_bytes else target_size
            if draft_size is not None:
                image.draft(image.mode, draft_size)
        # open() reads only the header and verify() passes truncated JPEGs: load() decodes every pixel.
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageError(f"image too large: {error}") from None
    except PILLOW_ERRORS as error:
        raise ImageError(f"truncated or corrupt image: {error}") from None

    # Read EXIF only after load(): on some broken PNGs getexif() first hides the error load() raises.
    if keep_bytes:
        return data, height, width
    orientation = _exif_orientation(image)

    try:
        if orientation not in (None, 1):
            image = ImageOps.exif_transpose(image)
        image = _to_rgb(image)
        if max_side is not None and max(image.size) > max_side:
            upright_width, upright_height = (
                (height, width) if orientation in TRANSPOSED_ORIENTATIONS else (width, height)
            )
            image = image.resize(
                _target_size(width=upright_width, height=upright_height, max_side=max_side),
                Image.Resampling.BILINEAR,
            )
        output = io.BytesIO()
        image.save(output, format="JPEG", quality=jpeg_quality)
    except PILLOW_ERRORS as error:
        raise ImageError(f"cannot convert image to RGB JPEG: {error}") from None
    return output.getvalue(), image.height, image.width


def _open(data: bytes) -> Image.Image:
    """Opens an image file (its header only) of an accepted format; raises ImageError otherwise."""
    if not data:
        raise ImageError("empty file")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"image too large: {error}") from None
    except PILLOW_ERRORS as error:
        raise ImageError(f"truncated or corrupt image: {error}") from None
    if image.format not in ACCEPTED_FORMATS:
        raise ImageError(f"unsupported format {image.format} (accepted: {', '.join(ACCEPTED_FORMATS)})")
    return image


def _target_size(*, width: int, height: int, max_side: int | None) -> tuple[int, int] | None:
    """Returns the (width, height) to downscale to, or None when the image already fits."""
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    # The longer side becomes exactly max_side; the shorter one keeps the aspect, at least 1 px.
    if width >= height:
        return max_side, max(1, round(height * scale))
    return max(1, round(width * scale)), max_side


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
    # Pillow's alpha_composite computes composite_on_white (the serving graph's formula) exactly, for every colour
    # and alpha (tests/test_images.py), in place on uint8: a large image needs no int32 copies here.
    foreground = image.convert("RGBA")
    background = Image.new("RGBA", foreground.size, BACKGROUND_COLOR)
    background.alpha_composite(foreground)
    return background.convert("RGB")


def composite_on_white(rgb, alpha):
    """Pixels over a white background, rounded: (rgb * alpha + 255 * (255 - alpha)) / 255 per channel, exactly
    Pillow's alpha_composite onto white.

    The one definition of transparent pixels: the serving signature applies it in its graph (trainer.input.data), and
    the converter's Pillow alpha_composite (_to_rgb) gives exactly these values for every colour and alpha, which
    tests/test_images.py checks. Operators only, so it takes numpy arrays and tensors alike.

    Args:
        rgb: int32 [..., 3] colours in [0, 255] (numpy array or tensor).
        alpha: int32 [..., 1] opacities in [0, 255] (0: transparent).

    Returns:
        int32 [..., 3] in [0, 255].
    """
    return (rgb * alpha + 255 * (255 - alpha) + 127) // 255
