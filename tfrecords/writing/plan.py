"""Decides, before any image is decoded, which file goes into which shard.

1. Hash pass: every listed file is read once and its sha256 and size recorded (in parallel).
2. Deduplication: of files with the same content, the first by relative path is kept and the others
   are skipped as "duplicate of <kept path>". When the copies are in different classes, the conflict
   is also listed in the manifest's `label_conflicts` (the kept copy keeps its class).
3. Shards: each split's shard count comes from its file count and bytes (count_shards); a file's shard is
   a stable hash of the seed and its path modulo that count (shard_of), and within a shard the files are
   in a stable pseudo-random order (sha256 of seed and path), which interleaves the classes.

Every step is a function of one file or of one group of files (same content, same shard), never of a
global sort: the local converter runs them in this process (make_plan), the Beam converter runs the very
same functions as pipeline stages on its workers (tfrecords/beam/planning.py), and the shards are
byte-identical either way, however many workers write them. Shard sizes vary around the mean by about
its square root (1% at 10,000 images a shard); with nearly as many shards as files a shard can be empty
(a valid, empty TFRecord file). A file that turns out not to decode just leaves its shard one example
shorter. The hash pass costs one extra read of every file; in exchange duplicates are found across the
whole folder, deterministically.
"""

import dataclasses
import hashlib
import json
import math

import tensorflow as tf

from tfrecords import schema
from tfrecords.writing import progress
from tfrecords.writing import shards

# Changing what a shard holds for the same inputs (e.g. JPEG quality; 3: shards by stable hash) must change
# this, so resumed runs do not keep shards written by an older version.
SHARD_FORMAT_VERSION = 3
# Skip reasons of files whose content is kept under another path (not failures: --max_skipped_fraction
# does not count them). "symbolic link..." and "same file as..." come from tfrecords/sources/folder.py.
SECOND_PATH_REASONS = ("duplicate of", "same file as", "symbolic link into", "symbolic link to a folder")
# hash_file reads a file in chunks of this size, so a worker never holds a whole (possibly huge) file to hash it.
HASH_CHUNK_BYTES = 8 * 2**20


# slots: a listing of 10 million files holds 10 million of these.
@dataclasses.dataclass(frozen=True, slots=True)
class SourceFile:
    """One candidate image file.

    Attributes:
        path: full path to read the file from (input_dir joined with relative_path).
        relative_path: path relative to input_dir, with "/" separators; stored in each example.
        class_name: name of the class folder.
        label: index of class_name in the sorted class names.
        split: one of schema.SPLITS.
    """

    path: str
    relative_path: str
    class_name: str
    label: int
    split: str


def stable_fraction(*, seed: int, relative_path: str) -> float:
    """Returns a number in [0, 1) that depends only on the seed and the path.

    Python's hash() is salted per process, so it would give a different split on every run.
    """
    digest = hashlib.sha256(f"{seed}:{relative_path}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


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


def order_key(*, seed: int, relative_path: str) -> tuple:
    """The sort key of a file within its shard: a stable pseudo-random order, so classes are interleaved."""
    # The path breaks (astronomically unlikely) ties, so the order never depends on the input order.
    return stable_fraction(seed=seed, relative_path=relative_path), relative_path


def order_files(*, files: list, seed: int) -> list:
    """Returns files (SourceFiles or HashedFiles) in their order within a shard (order_key)."""
    return sorted(files, key=lambda source_file: order_key(seed=seed, relative_path=source_file.relative_path))


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
    """Returns (sha256 digest, 32 bytes, and the size in bytes) of a file, or (None, error message) if it cannot be read."""
    digest, size = hashlib.sha256(), 0
    try:
        with tf.io.gfile.GFile(path, "rb") as source:
            # In chunks: a worker holds HASH_CHUNK_BYTES of a file, not the file (a 2 GB TIFF was 2 GB of memory).
            while chunk := source.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
    except tf.errors.OpError as error:
        return None, error.message
    finally:
        progress.report()
    return digest.digest(), size


def make_plan(
    *, files: list, classes: list, num_shards: int, target_shard_mb: float, seed: int, max_side: int | None,
    jpeg_quality: int, num_workers: int,
) -> Plan:
    """Hashes and deduplicates the listed files and assigns them to shards.

    Args:
        files: SourceFiles, each with its split.
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
    # The first file of each content, and the other files of contents seen more than once: no list per file.
    skipped, label_conflicts, first_by_digest, copies = [], [], {}, {}
    for source_file, (digest, size) in zip(files, hashes):
        if digest is None:
            skipped.append(unreadable_entry(source_file, size))
            continue
        hashed = HashedFile(source_file, digest, size)
        first = first_by_digest.setdefault(digest, hashed)
        if first is not hashed:
            copies.setdefault(digest, [first]).append(hashed)
    del hashes
    for digest, group in copies.items():
        first, duplicates, conflict = resolve_copies(group)
        first_by_digest[digest] = first
        skipped.extend(duplicates)
        label_conflicts.extend([conflict] if conflict else [])
    kept = list(first_by_digest.values())
    del first_by_digest
    settings = ShardSettings(classes=classes, seed=seed, max_side=max_side, jpeg_quality=jpeg_quality)
    tasks = []
    for split in schema.SPLITS:
        split_files = [hashed for hashed in kept if hashed.source_file.split == split]
        if not split_files:
            continue
        shard_count = count_shards(
            num_files=len(split_files), total_bytes=sum(hashed.size for hashed in split_files),
            num_shards=num_shards, target_shard_mb=target_shard_mb,
        )
        members = [[] for _ in range(shard_count)]
        for hashed in split_files:
            members[shard_of(seed=seed, relative_path=hashed.source_file.relative_path, num_shards=shard_count)].append(hashed)
        tasks.extend(
            make_task(split=split, index=index, shard_count=shard_count, members=members[index], settings=settings)
            for index in range(shard_count)
        )
    return Plan(tasks=tasks, skipped=sort_skipped(skipped), label_conflicts=sort_conflicts(label_conflicts))


@dataclasses.dataclass(frozen=True, slots=True)
class HashedFile:
    """A listed file after the hash pass: the SourceFile, its sha256 (32 bytes) and its size in bytes."""

    source_file: SourceFile
    digest: bytes
    size: int

    @property
    def relative_path(self) -> str:
        return self.source_file.relative_path


@dataclasses.dataclass(frozen=True)
class ShardSettings:
    """What besides its files determines a shard's bytes (the flags of the same names), the same for every shard."""

    classes: list
    seed: int
    max_side: int | None
    jpeg_quality: int


def unreadable_entry(source_file, message: str) -> dict:
    """The skipped entry of a file the hash pass could not read."""
    return {"path": source_file.relative_path, "reason": f"cannot read file: {message}"}


def resolve_copies(group: list) -> tuple:
    """Keeps the first by relative path of HashedFiles with the same content.

    Returns:
        (the kept HashedFile, skipped entries of the others, a label conflict dict or None when all copies
        are in one class).
    """
    group = sorted(group, key=lambda hashed: hashed.source_file.relative_path)
    first = group[0].source_file
    skipped, conflict = [], None
    for hashed in group[1:]:
        skipped.append({"path": hashed.source_file.relative_path, "reason": f"duplicate of {first.relative_path}"})
        if hashed.source_file.class_name != first.class_name:
            conflict = conflict or {"paths": [first.relative_path], "classes": [first.class_name]}
            conflict["paths"].append(hashed.source_file.relative_path)
            conflict["classes"].append(hashed.source_file.class_name)
    return group[0], skipped, conflict


def shard_of(*, seed: int, relative_path: str, num_shards: int) -> int:
    """Returns the shard (in [0, num_shards)) of a file: a stable hash, independent of the split's hash."""
    digest = hashlib.sha256(f"shard:{seed}:{relative_path}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def make_task(*, split: str, index: int, shard_count: int, members: list, settings: ShardSettings) -> shards.ShardTask:
    """Returns the ShardTask of shard `index` of a split from its HashedFiles (in any order)."""
    ordered = order_files(files=members, seed=settings.seed)
    images = tuple(
        shards.SourceImage(
            path=hashed.source_file.path, relative_path=hashed.source_file.relative_path,
            class_name=hashed.source_file.class_name, label=hashed.source_file.label,
        )
        for hashed in ordered
    )
    file = schema.shard_name(split, index, shard_count)
    header = {
        "version": SHARD_FORMAT_VERSION, "file": file, "max_side": settings.max_side, "classes": settings.classes,
        "jpeg_quality": settings.jpeg_quality,
    }
    # The images are hashed one by one: a shard of a million small files needs no JSON of them all at once.
    running = hashlib.sha256(json.dumps(header, sort_keys=True).encode("utf-8"))
    for image, hashed in zip(images, ordered):
        running.update(json.dumps([image.relative_path, image.class_name, image.label, hashed.digest.hex()]).encode("utf-8"))
    return shards.ShardTask(split=split, file=file, source=FileSource(images), fingerprint=running.hexdigest())


def sort_skipped(skipped: list) -> list:
    """Skipped entries in path order (the order of the manifest), however they were found."""
    return sorted(skipped, key=lambda entry: (entry["path"], entry["reason"]))


def sort_conflicts(label_conflicts: list) -> list:
    """Label conflicts in the order of their kept path, however they were found."""
    return sorted(label_conflicts, key=lambda conflict: conflict["paths"])


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
