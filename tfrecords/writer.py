"""Writes the planned shards (in parallel, resuming complete ones), labels.txt and manifest.json.

Shards are written under temporary names and renamed when complete (tfrecords/shards.py), and the
manifest is written last, so a conversion that stopped half-way never looks finished; rerun with the
same flags, it keeps the complete shards and rewrites the rest.
"""

import json

from absl import logging
import tensorflow as tf

from tfrecords import progress
from tfrecords import schema
from tfrecords import shards

FORMAT_VERSION = 1


def prepare_output_dir(*, output_dir: str, overwrite: bool, planned_files: list) -> None:
    """Clears what must not survive into this conversion; keeps shards a resumed run may reuse.

    With overwrite, the manifest and labels of an earlier finished conversion go first (so an
    interrupted rerun never leaves a manifest naming deleted shards). Shard files whose names are not
    in this plan (another shard count, a split that is now empty) and `.incomplete` files always go.

    Args:
        output_dir: the output folder, which exists.
        overwrite: the --overwrite flag.
        planned_files: the shard file names of this plan.
    """
    if overwrite:
        for name in (schema.MANIFEST_FILE, schema.LABELS_FILE):
            path = tf.io.gfile.join(output_dir, name)
            if tf.io.gfile.exists(path):
                tf.io.gfile.remove(path)
    planned = set(planned_files)
    for split in schema.SPLITS:
        for suffix in ("", shards.INCOMPLETE_SUFFIX):
            pattern = tf.io.gfile.join(output_dir, f"{split}-*-of-*.tfrecord{suffix}")
            for path in tf.io.gfile.glob(pattern):
                if suffix or path.rsplit("/", 1)[-1] not in planned:
                    tf.io.gfile.remove(path)


def write_shards(
    *, tasks: list, output_dir: str, max_side: int | None, jpeg_quality: int, classes: list, num_workers: int
) -> list:
    """Writes the shards of tasks that are not already complete; returns every shard's record, in order."""
    records = {}
    for task in tasks:
        record = shards.read_complete_shard(output_dir=output_dir, task=task)
        if record is not None:
            records[task.file] = record
    if records:
        logging.info("Resuming: %d of %d shards are already complete", len(records), len(tasks))
    todo = [task for task in tasks if task.file not in records]
    jobs = [(task, output_dir, max_side, jpeg_quality, classes) for task in todo]
    total = sum(len(task.images) for task in todo)
    written = progress.map_items(
        shards.write_shard, jobs, num_workers=num_workers, description="converting", unit="images", total=total,
    )
    records.update((record["file"], record) for record in written)
    return [records[task.file] for task in tasks]


def summarize_splits(*, tasks: list, records: list, classes: list) -> dict:
    """Returns the manifest's "splits": per split num_examples, class_counts and shards (empty ones left out)."""
    splits = {}
    for task, record in zip(tasks, records):
        split = splits.setdefault(
            task.split, {"num_examples": 0, "class_counts": {name: 0 for name in classes}, "shards": []}
        )
        split["num_examples"] += record["num_examples"]
        for name, count in record["class_counts"].items():
            split["class_counts"][name] += count
        split["shards"].append(
            {key: record[key] for key in ("file", "num_examples", "sha256", "size_bytes")}
        )
    # A split whose every file was skipped has no examples: leave it out, as the trainer expects.
    return {name: split for name, split in splits.items() if split["num_examples"]}


def remove_empty_splits(*, output_dir: str, tasks: list, splits: dict) -> None:
    """Removes the (empty) shards of splits left out of the manifest, so a glob finds only listed ones."""
    for task in tasks:
        if task.split not in splits:
            tf.io.gfile.remove(tf.io.gfile.join(output_dir, task.file))


def remove_progress(*, output_dir: str) -> None:
    """Removes the per-shard progress records once the manifest holds everything they said."""
    folder = tf.io.gfile.join(output_dir, shards.PROGRESS_FOLDER)
    if tf.io.gfile.exists(folder):
        tf.io.gfile.rmtree(folder)


def write_labels(*, output_dir: str, classes: list) -> None:
    """Writes labels.txt: one class name per line, line i is label id i."""
    text = "".join(f"{name}\n" for name in classes)
    _write_text_atomically(tf.io.gfile.join(output_dir, schema.LABELS_FILE), text)


def write_manifest(*, output_dir: str, manifest: dict) -> None:
    """Writes manifest.json (under a temporary name, then renamed, so readers never see half a file)."""
    text = json.dumps(manifest, indent=2) + "\n"
    _write_text_atomically(tf.io.gfile.join(output_dir, schema.MANIFEST_FILE), text)


def read_manifest(data_dir: str) -> dict:
    """Reads <data_dir>/manifest.json."""
    with tf.io.gfile.GFile(tf.io.gfile.join(data_dir, schema.MANIFEST_FILE), "r") as manifest_file:
        return json.load(manifest_file)


def make_manifest(*, source: dict, classes: list, splits: dict, skipped: list, label_conflicts: list) -> dict:
    """Returns the manifest dict.

    Args:
        source: what was converted and how (input_dir or tfds_name, layout, seed, fractions, max_side).
        classes: class names in label order.
        splits: from summarize_splits.
        skipped: {"path", "reason"} of every file not converted.
        label_conflicts: {"paths", "classes"} of identical files found in different classes.
    """
    return {
        "format_version": FORMAT_VERSION,
        **source,
        "image_format": "jpeg",
        "classes": list(classes),
        "splits": {split: splits[split] for split in schema.SPLITS if splits.get(split)},
        "skipped": sorted(skipped, key=lambda entry: entry["path"]),
        "label_conflicts": label_conflicts,
    }


def _write_text_atomically(path: str, text: str) -> None:
    temporary_path = path + shards.INCOMPLETE_SUFFIX
    with tf.io.gfile.GFile(temporary_path, "w") as output:
        output.write(text)
    tf.io.gfile.rename(temporary_path, path, overwrite=True)
