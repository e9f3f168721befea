"""The one TFRecord schema: written by `tfrecords.build`, read by `trainer.input.data`.

Every example holds one image, stored as JPEG bytes, with its label and where it came from:

    image/encoded     bytes   JPEG bytes (RGB, 8 bit)
    image/format      bytes   b"jpeg"
    image/height      int64   pixel height of the stored image
    image/width       int64   pixel width of the stored image
    image/class/label int64   label id: index of the class name in sorted class names (labels.txt)
    image/class/text  bytes   class name
    image/source      bytes   path of the source file relative to the input folder

Shards are named `<split>-%05d-of-%05d.tfrecord` (TF Model Garden style). Beside them:

    labels.txt        one class name per line; line i is label id i (also beside every exported model)
    manifest.json     the classes, each split's shards (with sizes and sha256) and counts, skipped files

This module is the one data contract: the converter writes these files and the trainer reads them only
through the functions here. write_text is the one atomic small-file write of the project.
"""

import json

import tensorflow as tf

SHARD_PATTERN = "{split}-{index:05d}-of-{count:05d}.tfrecord"
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.txt"
SPLITS = ("train", "validation", "test")
INCOMPLETE_SUFFIX = ".incomplete"

FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string, default_value=b"jpeg"),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64),
    "image/class/text": tf.io.FixedLenFeature([], tf.string),
    "image/source": tf.io.FixedLenFeature([], tf.string, default_value=b""),
}


def shard_name(split: str, index: int, count: int) -> str:
    """Returns the file name of shard `index` (0-based) of `count` shards of `split`."""
    return SHARD_PATTERN.format(split=split, index=index, count=count)


def _bytes_feature(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64_feature(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def make_example(
    *,
    encoded: bytes,
    height: int,
    width: int,
    label: int,
    class_name: str,
    source: str,
    image_format: str = "jpeg",
) -> tf.train.Example:
    """Builds one tf.train.Example in this schema."""
    feature = {
        "image/encoded": _bytes_feature(encoded),
        "image/format": _bytes_feature(image_format.encode("utf-8")),
        "image/height": _int64_feature(height),
        "image/width": _int64_feature(width),
        "image/class/label": _int64_feature(label),
        "image/class/text": _bytes_feature(class_name.encode("utf-8")),
        "image/source": _bytes_feature(source.encode("utf-8")),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def parse_example(serialized: tf.Tensor) -> dict:
    """Parses one serialized example (a scalar string tensor) into a dict of tensors.

    Works eagerly and inside tf.data (`dataset.map(parse_example)`).
    """
    return tf.io.parse_single_example(serialized, FEATURES)


def write_text(path: str, text: str) -> None:
    """Writes a small text file through tf.io.gfile under a temporary name, then renames it: readers never
    see half a file (a rename is atomic locally; on gs:// the object appears whole)."""
    temporary_path = path + INCOMPLETE_SUFFIX
    with tf.io.gfile.GFile(temporary_path, "w") as output:
        output.write(text)
    tf.io.gfile.rename(temporary_path, path, overwrite=True)


def write_labels(folder: str, class_names: list) -> None:
    """Writes <folder>/labels.txt: one class name per line, line i is label id i."""
    write_text(tf.io.gfile.join(folder, LABELS_FILE), "".join(f"{name}\n" for name in class_names))


def read_labels(folder: str) -> list | None:
    """Returns the class names of <folder>/labels.txt in label-id order, or None when there is no such file."""
    path = tf.io.gfile.join(folder, LABELS_FILE)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as file:
        return [line for line in file.read().splitlines() if line]


def write_manifest(data_dir: str, manifest: dict) -> None:
    """Writes <data_dir>/manifest.json, atomically (the converter writes it last: its presence means done)."""
    write_text(tf.io.gfile.join(data_dir, MANIFEST_FILE), json.dumps(manifest, indent=2) + "\n")


def has_manifest(data_dir: str) -> bool:
    return tf.io.gfile.exists(tf.io.gfile.join(data_dir, MANIFEST_FILE))


def read_manifest(data_dir: str) -> dict:
    """Reads <data_dir>/manifest.json written by `python -m tfrecords.build`.

    Raises:
        ValueError: there is none (naming --data_dir and the command that writes one).
    """
    if not has_manifest(data_dir):
        raise ValueError(
            f"--data_dir {data_dir!r} has no {MANIFEST_FILE}; "
            "create it with: python -m tfrecords.build --input_dir=<image folder> --output_dir=<data_dir>"
        )
    with tf.io.gfile.GFile(tf.io.gfile.join(data_dir, MANIFEST_FILE), "r") as file:
        return json.load(file)
