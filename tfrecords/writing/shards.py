"""Writes one shard, atomically and resumably; the unit of work of every worker.

A shard is written to `<name>.incomplete`. When it is complete, its record (example count, class
counts, skipped files, sha256 of its bytes and the fingerprint of what it was made from) is written to
`<output_dir>/_progress/<name>.json`, and only then is the shard renamed to its final name. So a file
under a final shard name is complete, and a rerun knows it may keep it when the record's fingerprint
matches the plan and the file's sha256 matches the record. A kill at any moment leaves either an
`.incomplete` file (rewritten by the rerun) or a record without its final file (rewritten too).

Records are framed in the TFRecord format here (length, masked CRC32C of the length, data, masked CRC32C
of the data), so the sha256 is computed while writing, without reading the shard back.
"""

import dataclasses
import hashlib
import json
import struct

from absl import logging
import google_crc32c
import tensorflow as tf

from tfrecords import schema
from tfrecords.writing import images
from tfrecords.writing import progress

INCOMPLETE_SUFFIX = schema.INCOMPLETE_SUFFIX
PROGRESS_FOLDER = "_progress"
CRC_MASK_DELTA = 0xA282EAD8
READ_CHUNK_BYTES = 8 * 2**20


@dataclasses.dataclass(frozen=True, slots=True)
class SourceImage:
    """One image planned into a shard: where to read it and what it is."""

    path: str
    relative_path: str
    class_name: str
    label: int


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard, decided before any image is decoded.

    Attributes:
        split: one of schema.SPLITS.
        file: the shard's file name, schema.shard_name(split, index, count).
        source: where its images come from, an object that reads itself: `source.read()` yields
            (SourceImage, bytes or the read error) in order, and `source.images` holds the SourceImages
            known before reading (() when only reading tells). plan.FileSource and
            tfds_source.TfdsSource are the two kinds; this module knows neither.
        fingerprint: sha256 of everything that determines the shard's bytes.
    """

    split: str
    file: str
    source: object
    fingerprint: str = ""

    @property
    def images(self) -> tuple:
        return self.source.images


def record_path(output_dir: str, file: str) -> str:
    """Returns the path of the progress record of shard `file`."""
    return tf.io.gfile.join(output_dir, PROGRESS_FOLDER, file + ".json")


def read_complete_shard(*, output_dir: str, task: ShardTask) -> dict | None:
    """Returns the record of a shard already complete for this task, or None if it must be written."""
    path = record_path(output_dir, task.file)
    shard_path = tf.io.gfile.join(output_dir, task.file)
    if not (tf.io.gfile.exists(path) and tf.io.gfile.exists(shard_path)):
        return None
    with tf.io.gfile.GFile(path, "r") as record_file:
        record = json.load(record_file)
    if record.get("fingerprint") != task.fingerprint:
        return None
    if tf.io.gfile.stat(shard_path).length != record["size_bytes"]:
        return None
    if file_sha256(shard_path) != record["sha256"]:
        return None
    return record


def file_sha256(path: str) -> str:
    """Returns the hex sha256 of a file's bytes, read in chunks so memory stays flat."""
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as source:
        while chunk := source.read(READ_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(job: tuple) -> dict:
    """Writes one shard and returns its record; run by the workers.

    Args:
        job: (task, output_dir, max_side, jpeg_quality, classes): a ShardTask, the output folder, the
            --max_side value (or None), the --jpeg_quality value and all class names in label order.

    Returns:
        The record: file, num_examples, sha256, size_bytes, class_counts, skipped, fingerprint.
    """
    task, output_dir, max_side, jpeg_quality, classes = job
    final_path = tf.io.gfile.join(output_dir, task.file)
    temporary_path = final_path + INCOMPLETE_SUFFIX
    class_counts = {class_name: 0 for class_name in classes}
    skipped = []
    digest = hashlib.sha256()
    size_bytes = 0
    num_examples = 0
    with tf.io.gfile.GFile(temporary_path, "wb") as output:
        # GFile creates the file on the first write; a shard whose every file is skipped is still written.
        output.write(b"")
        for source, data in task.source.read():
            progress.report()
            try:
                if isinstance(data, Exception):
                    raise images.ImageError(f"cannot read file: {data}")
                encoded, height, width = images.load_image(data, max_side=max_side, jpeg_quality=jpeg_quality)
            except images.ImageError as error:
                logging.warning("Skipping %s: %s", source.relative_path, error)
                skipped.append({"path": source.relative_path, "reason": str(error)})
                continue
            example = schema.make_example(
                encoded=encoded,
                height=height,
                width=width,
                label=source.label,
                class_name=source.class_name,
                source=source.relative_path,
            )
            # deterministic=True sorts the feature map: its default order varies between processes.
            framed = frame_record(example.SerializeToString(deterministic=True))
            output.write(framed)
            digest.update(framed)
            size_bytes += len(framed)
            class_counts[source.class_name] += 1
            num_examples += 1
    record = {
        "file": task.file,
        "num_examples": num_examples,
        "sha256": digest.hexdigest(),
        "size_bytes": size_bytes,
        "class_counts": class_counts,
        "skipped": skipped,
        "fingerprint": task.fingerprint,
    }
    path = record_path(output_dir, task.file)
    tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
    schema.write_text(path, json.dumps(record, indent=1))
    tf.io.gfile.rename(temporary_path, final_path, overwrite=True)
    return record


def frame_record(data: bytes) -> bytes:
    """Returns data framed as one TFRecord record (what tf.io.TFRecordWriter writes)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + CRC_MASK_DELTA) & 0xFFFFFFFF
