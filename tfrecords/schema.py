"""The one TFRecord schema: written by `tfrecords.build`, read by `trainer.data`.

Every example holds one image, stored as JPEG bytes, with its label and where it came from:

    image/encoded     bytes   JPEG bytes (RGB, 8 bit)
    image/format      bytes   b"jpeg"
    image/height      int64   pixel height of the stored image
    image/width       int64   pixel width of the stored image
    image/class/label int64   label id: index of the class name in sorted class names (labels.txt)
    image/class/text  bytes   class name
    image/source      bytes   path of the source file relative to the input folder

Shards are named `<split>-%05d-of-%05d.tfrecord` (TF Model Garden style).
"""

import tensorflow as tf

SHARD_PATTERN = "{split}-{index:05d}-of-{count:05d}.tfrecord"
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.txt"
SPLITS = ("train", "validation", "test")

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
