"""What both benchmarks share: converting the image folder once, and timing a stream of batches."""

import gc
import os
import random
import resource
import statistics
import subprocess
import sys
import time

import tensorflow as tf
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_IMAGE_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "flowers_small")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def _converter_has_max_side() -> bool:
    help_text = subprocess.run(
        [sys.executable, "-m", "tfrecords.build", "--helpfull"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout
    return "--max_side" in help_text


def _resized_copy(image_dir: str, output_dir: str, max_side: int) -> None:
    """Copies the image folder with every image shrunk to at most max_side (for converters without --max_side)."""
    for root, _, names in os.walk(image_dir):
        for name in names:
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            destination = os.path.join(output_dir, os.path.relpath(root, image_dir), os.path.splitext(name)[0] + ".jpg")
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            with Image.open(os.path.join(root, name)) as image:
                image = image.convert("RGB")
                image.thumbnail((max_side, max_side), Image.BILINEAR)
                image.save(destination, quality=90)


def upscaled_copy(image_dir: str, output_dir: str, *, count: int, long_side: int = 3000, quality: int = 90) -> str:
    """Writes (once) `count` photos of image_dir, spread over its classes, upscaled to phone size (4:3, long side
    `long_side`, JPEG `quality`): real content at the resolution a phone stores, for benchmarks only."""
    if os.path.exists(os.path.join(output_dir, ".complete")):
        return output_dir
    classes = sorted(name for name in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, name)))
    short_side = long_side * 3 // 4
    for class_name in classes:
        names = sorted(name for name in os.listdir(os.path.join(image_dir, class_name))
                       if name.lower().endswith(IMAGE_EXTENSIONS))[:max(1, count // len(classes))]
        os.makedirs(os.path.join(output_dir, class_name), exist_ok=True)
        for name in names:
            with Image.open(os.path.join(image_dir, class_name, name)) as image:
                image = image.convert("RGB")
                size = (long_side, short_side) if image.width >= image.height else (short_side, long_side)
                destination = os.path.join(output_dir, class_name, os.path.splitext(name)[0] + ".jpg")
                image.resize(size, Image.BICUBIC).save(destination, quality=quality)
    open(os.path.join(output_dir, ".complete"), "w").close()
    return output_dir


def convert(image_dir: str, output_dir: str, max_side: int = 0, jpeg_quality: int = 0) -> str:
    """Converts image_dir (all of it into the train split) with `python -m tfrecords.build`, once.

    max_side: the converter's --max_side; 0 stores the images as they are (not the converter's default).
    jpeg_quality: the converter's --jpeg_quality for re-encoded images; 0 keeps its default.
    """
    if os.path.exists(os.path.join(output_dir, "manifest.json")):
        return output_dir
    command = [
        sys.executable, "-m", "tfrecords.build", f"--output_dir={output_dir}", "--validation_fraction=0",
        "--test_fraction=0", "--num_shards=4", "--overwrite",
    ]
    if jpeg_quality:
        command.append(f"--jpeg_quality={jpeg_quality}")
    if _converter_has_max_side():
        command.append(f"--max_side={max_side}")  # 0 too: "as is" must not take the converter's default
    elif max_side:
        resized_dir = output_dir + "_images"
        _resized_copy(image_dir, resized_dir, max_side)
        image_dir = resized_dir
    subprocess.run(command + [f"--input_dir={image_dir}"], cwd=REPO_ROOT, check=True, capture_output=True)
    return output_dir


def on_shared_pool(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """The same pipeline on TensorFlow's inter-op thread pool instead of a pool of its own (the old default)."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = 0
    return dataset.with_options(options)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(datasets: list, *, batch_size: int, num_batches: int, warmup_batches: int, rounds: int) -> list:
    """Times each dataset in `rounds` interleaved rounds; returns [(median images/s, median images per CPU-second)].

    Each round reads every dataset in turn, in a new random order (seeded), from a fresh iterator:
    `warmup_batches` untimed (AUTOTUNE settles), then `num_batches` timed; the iterator is dropped before
    the next dataset starts, so only one pipeline runs at a time. Interleaving spreads every dataset's runs
    over the whole benchmark, so a slow spell of this shared machine lowers all of them alike instead of
    one row's ratio; the shuffled order keeps any effect of the position in a round off a fixed row.
    Images per CPU-second is the per-core rate: it does not depend on how many cores were free.
    """
    rates = [[] for _ in datasets]
    cpu_rates = [[] for _ in datasets]
    images = num_batches * batch_size
    order = list(range(len(datasets)))
    shuffler = random.Random(0)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for index in order:
            iterator = iter(datasets[index])
            for _ in range(warmup_batches):
                next(iterator)
            start, cpu_start = time.perf_counter(), _cpu_seconds()
            for _ in range(num_batches):
                next(iterator)
            rates[index].append(images / (time.perf_counter() - start))
            cpu_rates[index].append(images / max(_cpu_seconds() - cpu_start, 1e-9))
            del iterator
            gc.collect()  # stops the pipeline's threads now, not at some later collection
    return [(statistics.median(rate), statistics.median(cpu)) for rate, cpu in zip(rates, cpu_rates)]
