"""Decides, before any image is decoded, which file goes into which shard.

1. Hash pass: every listed file is read once and its sha256 and size recorded (in parallel).
2. Deduplication: of files with the same content, the first by relative path is kept and the others
   are skipped as "duplicate of <kept path>". When the copies are in different classes, the conflict
   is also listed in the manifest's `label_conflicts` (the kept copy keeps its class).
3. Shards: each split's remaining files are put in a stable pseudo-random order (sha256 of seed and
   path), which interleaves the classes, and example i goes to shard i % number of shards.

All of this depends only on the listing, the file contents and the flags, never on the number of
workers, so the shards are byte-identical however many workers write them. A file that turns out not
to decode just leaves its shard one example shorter. The hash pass costs one extra read of every file;
in exchange duplicates are found across the whole folder, deterministically.
"""

import dataclasses
import hashlib
import json
import math

import tensorflow as tf

from tfrecords import folder
from tfrecords import progress
from tfrecords import schema
from tfrecords import shards

# Changing what a shard holds for the same inputs (e.g. JPEG quality) must change this, so resumed runs
# do not keep shards written by an older version.
SHARD_FORMAT_VERSION = 2
# Skip reasons of files whose content is kept under another path (not failures: --max_skipped_fraction
# does not count them). "symbolic link..." and "same file as..." come from tfrecords/folder.py.
SECOND_PATH_REASONS = ("duplicate of", "same file as", "symbolic link into", "symbolic link to a folder")


@dataclasses.dataclass(frozen=True)
class Plan:
    """The shards to write and what was decided about the listed files.

    Attributes:
        tasks: the ShardTasks, split by split in schema.SPLITS order.
        skipped: {"path", "reason"} of duplicates and unreadable files, found before decoding.
        label_conflicts: {"paths", "classes"} of identical files found in different classes.
    """

    tasks: list
    skipped: list
    label_conflicts: list


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


def count_shards(*, num_files: int, total_bytes: int, num_shards: int, target_shard_mb: float) -> int:
    """Returns how many shards to write for one split.

    Args:
        num_files: files in the split.
        total_bytes: their total size.
        num_shards: shards wanted; 0 or less means automatic from target_shard_mb.
        target_shard_mb: automatic mode aims at shards of about this many MiB of source files.

    Returns:
        The number of shards, at least 1 and at most num_files (no shard is left empty on purpose).
    """
    if num_shards <= 0:
        num_shards = math.ceil(total_bytes / (target_shard_mb * 2**20))
    return max(1, min(num_shards, num_files))


def hash_file(path: str) -> tuple:
    """Returns (sha256 hex, size in bytes) of a file, or (None, error message) if it cannot be read."""
    try:
        with tf.io.gfile.GFile(path, "rb") as source:
            data = source.read()
    except tf.errors.OpError as error:
        return None, error.message
    finally:
        progress.report()
    return hashlib.sha256(data).hexdigest(), len(data)


def make_plan(
    *, files: list, classes: list, num_shards: int, target_shard_mb: float, seed: int, max_side: int | None,
    jpeg_quality: int, num_workers: int,
) -> Plan:
    """Hashes and deduplicates the listed files and assigns them to shards.

    Args:
        files: folder.SourceFiles, each with its split.
        classes: all class names, in label order.
        num_shards: shards per split; 0 picks the number from target_shard_mb.
        target_shard_mb: automatic shard size, in MiB of source files.
        seed: seed of the example order.
        max_side: the --max_side value (part of each shard's fingerprint).
        jpeg_quality: the --jpeg_quality value (part of each shard's fingerprint).
        num_workers: processes for the hash pass.

    Returns:
        A Plan.
    """
    hashes = progress.map_items(
        hash_file, [source_file.path for source_file in files], num_workers=num_workers,
        description="hashing", unit="files", total=len(files),
    )
    skipped = []
    label_conflicts = {}
    first_by_hash = {}
    kept = []
    for source_file, (digest, size) in sorted(zip(files, hashes), key=lambda pair: pair[0].relative_path):
        if digest is None:
            skipped.append({"path": source_file.relative_path, "reason": f"cannot read file: {size}"})
            continue
        first = first_by_hash.setdefault(digest, source_file)
        if first is not source_file:
            skipped.append({"path": source_file.relative_path, "reason": f"duplicate of {first.relative_path}"})
            if first.class_name != source_file.class_name:
                conflict = label_conflicts.setdefault(digest, {"paths": [first.relative_path], "classes": [first.class_name]})
                conflict["paths"].append(source_file.relative_path)
                conflict["classes"].append(source_file.class_name)
            continue
        kept.append((source_file, digest, size))

    tasks = []
    for split in schema.SPLITS:
        split_files = [entry for entry in kept if entry[0].split == split]
        if not split_files:
            continue
        shard_count = count_shards(
            num_files=len(split_files), total_bytes=sum(size for _, _, size in split_files),
            num_shards=num_shards, target_shard_mb=target_shard_mb,
        )
        digests = {source_file.relative_path: digest for source_file, digest, _ in split_files}
        ordered = order_files(files=[source_file for source_file, _, _ in split_files], seed=seed)
        for index in range(shard_count):
            members = [
                shards.SourceImage(
                    path=source_file.path, relative_path=source_file.relative_path,
                    class_name=source_file.class_name, label=source_file.label,
                )
                for source_file in ordered[index::shard_count]
            ]
            file = schema.shard_name(split, index, shard_count)
            identity = {
                "version": SHARD_FORMAT_VERSION, "file": file, "max_side": max_side, "classes": classes,
                "jpeg_quality": jpeg_quality,
                "images": [[m.relative_path, m.class_name, m.label, digests[m.relative_path]] for m in members],
            }
            task = shards.ShardTask(split=split, file=file, source=FileSource(tuple(members)), fingerprint=fingerprint(identity))
            tasks.append(task)
    return Plan(tasks=tasks, skipped=skipped, label_conflicts=list(label_conflicts.values()))


@dataclasses.dataclass(frozen=True)
class FileSource:
    """The image files of one shard (a ShardTask's source), read in order."""

    images: tuple

    def read(self):
        """Yields (SourceImage, bytes or the read error) for every image, in order."""
        for image in self.images:
            try:
                with tf.io.gfile.GFile(image.path, "rb") as source_file:
                    yield image, source_file.read()
            except tf.errors.OpError as error:
                # A file deleted or unreadable since the listing: skipped like an undecodable one.
                yield image, error


def fingerprint(identity: dict) -> str:
    """Returns the sha256 of a JSON-able description of what determines a shard's bytes."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()
