"""Writes a small folder of generated shape images, for the README demo and the tests.

    python -m tfrecords.demo_images --output_dir=/tmp/demo_images --num_per_class=40

Three classes (circle, square, triangle), one shape per image on a noisy background, at a random
position, size, angle and colour; image sizes vary between 48 and 120 px and are often not square. By
default each class also leans towards one colour (circles reddish, squares greenish, triangles bluish), so
even a tiny randomly initialised network learns something in a few steps (what the tests need).
`--nocolor_cue` (the README demo) drops that: only the outline tells the classes apart, which a network
learns in a few steps only from pretrained features. Most images are JPEG; every tenth is PNG, so the
converter's re-encoding path runs too. The same seed gives the same files.
"""

import io
import math

from absl import app
from absl import flags
import numpy as np
from PIL import Image
from PIL import ImageDraw
import tensorflow as tf

from tfrecords import cli

CLASS_NAMES = ("circle", "square", "triangle")
MIN_SIZE = 48
MAX_SIZE = 120
COLOR_BIAS = 60
PNG_EVERY = 10


def write_demo_images(output_dir: str, *, num_per_class: int = 40, seed: int = 0, color_cue: bool = True) -> list:
    """Writes <output_dir>/<class>/<class>_<index>.{jpg,png}.

    Args:
        output_dir: folder to write into, local or gs://; created if missing.
        num_per_class: images per class.
        seed: random seed; the same seed writes the same images.
        color_cue: each class leans towards one colour; False: colours say nothing about the class.

    Returns:
        The class names, sorted (so index = label id).
    """
    rng = np.random.default_rng(seed)
    for class_index, class_name in enumerate(CLASS_NAMES):
        class_dir = tf.io.gfile.join(output_dir, class_name)
        tf.io.gfile.makedirs(class_dir)
        for index in range(num_per_class):
            image = _draw_image(rng=rng, class_name=class_name, class_index=class_index if color_cue else None)
            image_format = "PNG" if index % PNG_EVERY == PNG_EVERY - 1 else "JPEG"
            encoded = io.BytesIO()
            image.save(encoded, format=image_format)
            extension = "png" if image_format == "PNG" else "jpg"
            path = tf.io.gfile.join(class_dir, f"{class_name}_{index:03d}.{extension}")
            with tf.io.gfile.GFile(path, "wb") as output:
                output.write(encoded.getvalue())
    return sorted(CLASS_NAMES)


def _draw_image(*, rng: np.random.Generator, class_name: str, class_index: int | None) -> Image.Image:
    width, height = (int(size) for size in rng.integers(MIN_SIZE, MAX_SIZE + 1, size=2))
    background_color = rng.integers(60, 196, size=3)
    noise = rng.normal(0, 20, size=(height, width, 3))
    pixels = np.clip(background_color + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)

    if class_index is None:
        shape_color = rng.integers(0, 256, size=3)
    else:
        shape_color = rng.integers(0, 256 - COLOR_BIAS, size=3)
        shape_color[class_index] += COLOR_BIAS
    radius = rng.uniform(0.25, 0.45) * min(width, height)
    center_x = rng.uniform(radius, width - radius)
    center_y = rng.uniform(radius, height - radius)
    box = (center_x - radius, center_y - radius, center_x + radius, center_y + radius)
    fill = tuple(int(value) for value in shape_color)
    draw = ImageDraw.Draw(image)
    if class_index is None:  # any angle: only the outline tells the class
        corners = {"circle": 0, "square": 4, "triangle": 3}[class_name]
        if corners:
            draw.polygon(_regular_polygon(center_x, center_y, radius, corners, float(rng.uniform(0, 2 * math.pi))),
                         fill=fill)
        else:
            draw.ellipse(box, fill=fill)
    elif class_name == "circle":
        draw.ellipse(box, fill=fill)
    elif class_name == "square":
        draw.rectangle(box, fill=fill)
    else:
        top = (center_x, center_y - radius)
        bottom_left = (center_x - radius, center_y + radius)
        bottom_right = (center_x + radius, center_y + radius)
        draw.polygon([top, bottom_left, bottom_right], fill=fill)
    return image


def _regular_polygon(center_x: float, center_y: float, radius: float, corners: int, angle: float) -> list:
    """The corners of a regular polygon inscribed in the circle of `radius`, turned by `angle` radians."""
    return [(center_x + radius * math.cos(angle + 2 * math.pi * index / corners),
             center_y + radius * math.sin(angle + 2 * math.pi * index / corners)) for index in range(corners)]


FLAGS = flags.FLAGS


def main(argv: list) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    class_names = write_demo_images(
        FLAGS.output_dir, num_per_class=FLAGS.num_per_class, seed=FLAGS.seed, color_cue=FLAGS.color_cue
    )
    print(f"wrote {FLAGS.num_per_class} images per class ({', '.join(class_names)}) to {FLAGS.output_dir}")


def _define_flags() -> None:
    flags.DEFINE_string("output_dir", None, "Folder to write the demo images into, local or gs://.")
    flags.DEFINE_integer("num_per_class", 40, "Images per class.")
    flags.DEFINE_integer("seed", 0, "Random seed; the same seed writes the same images.")
    flags.DEFINE_bool("color_cue", True, "Each class leans towards one colour; --nocolor_cue: only the shape tells.")
    flags.mark_flag_as_required("output_dir")


if __name__ == "__main__":
    # Defined only when run as a program: tests import write_demo_images next to tfrecords.build,
    # whose --output_dir and --seed flags would otherwise clash with these.
    _define_flags()
    app.run(cli.frozen_heap(main), flags_parser=cli.parse_flags)
