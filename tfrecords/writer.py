"""Writes the listed files of one split into TFRecord shards, and the labels and manifest files.

Each shard is written under a temporary name (`<name>.incomplete`) and renamed when complete, and the
manifest is written last, so a conversion that stopped half-way never looks finished.
"""

import json
import math

from absl import logging
import tensorflow as tf

from tfrecords import folder
from tfrecords import images
from tfrecords import schema

INCOMPLETE_SUFFIX = ".incomplete"
FORMAT_VERSION = 1
LOG_EVERY_FILES = 1000


def order_files(*, files: list, seed: int) -> list:
    """Returns files in a stable pseudo-random order, so classes are interleaved within each shard."""
    # The path breaks (astronomically unlikely) ties, so the order never depends on the input order.
    return sorted(
        files,
        key=lambda source_file: (
            folder.stable_fraction(seed=seed, relative_path=source_file.relative_path),
            source_file.relative_path,
        ),
    )


def count_shards(*, files: list, num_shards: int, target_shard_mb: float) -> int:
    """Returns how many shards to write for these files.

    Args:
        files: the SourceFiles of one split.
        num_shards: shards wanted; 0 or less means automatic from target_shard_mb.
        target_shard_mb: automatic mode aims at shards of about this many MiB of source files.

    Returns:
        The number of shards, at least 1 and at most the number of files (no shard is left empty on
        purpose).
    """
    if num_shards <= 0:
        # Stat only in automatic mode: on gs:// it is one request per file.
        total_bytes = sum(tf.io.gfile.stat(source_file.path).length for source_file in files)
        num_shards = math.ceil(total_bytes / (target_shard_mb * 2**20))
    return max(1, min(num_shards, len(files)))


def write_split(
    *,
    split: str,
    files: list,
    classes: list,
    output_dir: str,
    num_shards: int,
    target_shard_mb: float,
    seed: int,
) -> tuple[dict | None, list]:
    """Converts the files of one split and writes them into shards `<split>-%05d-of-%05d.tfrecord`.

    Example i (in the order of order_files, counting only converted files) goes to shard
    i % number of shards, so shards differ by at most one example.

    Args:
        split: one of schema.SPLITS.
        files: the SourceFiles of this split.
        classes: all class names, in label order.
        output_dir: local or gs:// folder that exists.
        num_shards: shards wanted; 0 means automatic from target_shard_mb.
        target_shard_mb: automatic shard size in MiB of source files.
        seed: seed of the example order.

    Returns:
        (summary, skipped): summary is this split's entry of the manifest ("num_examples",
        "class_counts", "shards"), or None when no file of the split could be converted; skipped is a
        list of {"path", "reason"} for the files that are not usable images.
    """
    shard_count = count_shards(files=files, num_shards=num_shards, target_shard_mb=target_shard_mb)
    shard_files = [schema.shard_name(split, index, shard_count) for index in range(shard_count)]
    temporary_paths = [tf.io.gfile.join(output_dir, name) + INCOMPLETE_SUFFIX for name in shard_files]
    shard_sizes = [0] * shard_count
    class_counts = {class_name: 0 for class_name in classes}
    skipped = []
    num_examples = 0

    shard_writers = [tf.io.TFRecordWriter(path) for path in temporary_paths]
    try:
        for file_index, source_file in enumerate(order_files(files=files, seed=seed)):
            if file_index % LOG_EVERY_FILES == 0:
                logging.info("%s: %d of %d files", split, file_index, len(files))
            with tf.io.gfile.GFile(source_file.path, "rb") as source:
                data = source.read()
            try:
                encoded, height, width = images.load_image(data)
            except images.ImageError as error:
                logging.warning("Skipping %s: %s", source_file.relative_path, error)
                skipped.append({"path": source_file.relative_path, "reason": str(error)})
                continue
            example = schema.make_example(
                encoded=encoded,
                height=height,
                width=width,
                label=source_file.label,
                class_name=source_file.class_name,
                source=source_file.relative_path,
            )
            shard_index = num_examples % shard_count
            shard_writers[shard_index].write(example.SerializeToString())
            shard_sizes[shard_index] += 1
            class_counts[source_file.class_name] += 1
            num_examples += 1
    finally:
        for shard_writer in shard_writers:
            shard_writer.close()

    if num_examples == 0:
        for path in temporary_paths:
            tf.io.gfile.remove(path)
        return None, skipped
    for temporary_path, name in zip(temporary_paths, shard_files):
        tf.io.gfile.rename(temporary_path, tf.io.gfile.join(output_dir, name), overwrite=True)
    summary = {
        "num_examples": num_examples,
        "class_counts": class_counts,
        "shards": [{"file": name, "num_examples": size} for name, size in zip(shard_files, shard_sizes)],
    }
    return summary, skipped


def remove_previous_output(*, output_dir: str) -> None:
    """Removes the manifest, labels and shards of an earlier conversion in output_dir.

    The manifest goes first, so an interrupted rerun never leaves a manifest naming deleted shards; old
    shards go too, because a different shard count gives different names and they would linger.
    """
    for name in (schema.MANIFEST_FILE, schema.LABELS_FILE):
        path = tf.io.gfile.join(output_dir, name)
        if tf.io.gfile.exists(path):
            tf.io.gfile.remove(path)
    for split in schema.SPLITS:
        for suffix in ("", INCOMPLETE_SUFFIX):
            pattern = tf.io.gfile.join(output_dir, f"{split}-*-of-*.tfrecord{suffix}")
            for path in tf.io.gfile.glob(pattern):
                tf.io.gfile.remove(path)


def write_labels(*, output_dir: str, classes: list) -> None:
    """Writes labels.txt: one class name per line, line i is label id i."""
    text = "".join(f"{name}\n" for name in classes)
    _write_text_atomically(tf.io.gfile.join(output_dir, schema.LABELS_FILE), text)


def write_manifest(*, output_dir: str, manifest: dict) -> None:
    """Writes manifest.json (under a temporary name, then renamed, so readers never see half a file)."""
    text = json.dumps(manifest, indent=2) + "\n"
    _write_text_atomically(tf.io.gfile.join(output_dir, schema.MANIFEST_FILE), text)


def make_manifest(
    *,
    input_dir: str,
    layout: str,
    seed: int,
    validation_fraction: float,
    test_fraction: float,
    classes: list,
    splits: dict,
    skipped: list,
) -> dict:
    """Returns the manifest dict; `splits` maps split name to write_split's summary (None is left out)."""
    return {
        "format_version": FORMAT_VERSION,
        "input_dir": input_dir,
        "layout": layout,
        "seed": seed,
        "validation_fraction": validation_fraction,
        "test_fraction": test_fraction,
        "image_format": "jpeg",
        "classes": list(classes),
        "splits": {split: splits[split] for split in schema.SPLITS if splits.get(split)},
        "skipped": skipped,
    }


def _write_text_atomically(path: str, text: str) -> None:
    temporary_path = path + INCOMPLETE_SUFFIX
    with tf.io.gfile.GFile(temporary_path, "w") as output:
        output.write(text)
    tf.io.gfile.rename(temporary_path, path, overwrite=True)
