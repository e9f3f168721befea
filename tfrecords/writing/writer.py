"""Writes the planned shards (in parallel, resuming complete ones), labels.txt and manifest.json.

Shards are written under temporary names and renamed when complete (tfrecords/writing/shards.py), and the
manifest is written last, so a conversion that stopped half-way never looks finished; rerun with the
same flags, it keeps the complete shards and rewrites the rest.
"""

import json
import os

from absl import logging
import tensorflow as tf

from tfrecords import schema
from tfrecords.writing import progress
from tfrecords.writing import shards

FORMAT_VERSION = 1
# Written into an output folder before anything else: it marks the folder as this converter's, so a
# rerun may resume or replace what is there. A non-empty folder without it (or a manifest) is refused.
OWNER_FILE = ".tfrecords_build"
# With --overwrite, the new conversion is written here and swapped in only once it has succeeded.
REPLACEMENT_FOLDER = "_replacement"
# The Beam planning job's task files and summary, in the progress folder (tfrecords/beam/planning.py).
BEAM_PLAN_FOLDER = "plan"


def check_output_dir(*, output_dir: str, overwrite: bool, input_dir: str | None) -> None:
    """Refuses an output folder the converter must not write into; writes nothing.

    Raises:
        ValueError: output_dir is a file, is inside input_dir (or holds it), is a non-empty folder this
            converter did not write, or holds a finished conversion and overwrite is off.
    """
    if tf.io.gfile.exists(output_dir) and not tf.io.gfile.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir!r} is a file; pass a new or empty folder")
    if input_dir:
        inner, outer = _resolved(output_dir), _resolved(input_dir)
        if inner == outer or inner.startswith(outer + "/"):
            raise ValueError(
                f"--output_dir {output_dir!r} is inside --input_dir {input_dir!r}: it would be listed as a class "
                "and converted into itself; choose an --output_dir outside the image folder"
            )
        if outer.startswith(inner + "/"):
            raise ValueError(
                f"--input_dir {input_dir!r} is inside --output_dir {output_dir!r}; choose an --output_dir that "
                "does not hold the images"
            )
    if not tf.io.gfile.exists(output_dir):
        return
    names = sorted(name.rstrip("/") for name in tf.io.gfile.listdir(output_dir))
    if names and not is_owned(output_dir):
        raise ValueError(
            f"--output_dir {output_dir!r} is not empty ({', '.join(repr(name) for name in names[:3])}"
            f"{', ...' if len(names) > 3 else ''}) and was not written by tfrecords.build; nothing in it is "
            "touched: choose a new or empty folder"
        )
    if not overwrite and schema.has_manifest(output_dir):
        raise ValueError(
            f"--output_dir {output_dir!r} already holds a conversion ({schema.MANIFEST_FILE}); "
            "pass --overwrite to replace it, or choose another --output_dir"
        )


def is_owned(output_dir: str) -> bool:
    """True when output_dir was written by this converter: it has OWNER_FILE, or a manifest of ours."""
    if tf.io.gfile.exists(tf.io.gfile.join(output_dir, OWNER_FILE)):
        return True
    if not schema.has_manifest(output_dir):
        return False
    try:
        # Conversions from before OWNER_FILE existed: a manifest of this format is proof enough.
        return "format_version" in schema.read_manifest(output_dir)
    except (ValueError, tf.errors.OpError):
        return False


def claim_output_dir(output_dir: str) -> None:
    """Creates output_dir if needed and marks it as this converter's (see OWNER_FILE)."""
    tf.io.gfile.makedirs(output_dir)
    path = tf.io.gfile.join(output_dir, OWNER_FILE)
    if not tf.io.gfile.exists(path):
        schema.write_text(path, json.dumps({"written_by": "tfrecords.build", "format_version": FORMAT_VERSION}) + "\n")


def _resolved(path: str) -> str:
    """An absolute, link-free form of a local path (remote paths as given), for comparing folders."""
    if "://" in path:
        return path.rstrip("/")
    return os.path.realpath(path)


def prepare_output_dir(*, output_dir: str, planned_files: list) -> str:
    """Readies the folder the new shards are written to; returns it.

    Over a finished conversion (only reached with --overwrite), the new shards go to the REPLACEMENT_FOLDER
    inside output_dir, and replace_finished() swaps them in once the conversion has succeeded: until then
    the earlier conversion stays whole, and if the new one fails (too many undecodable files) it is never
    touched. Otherwise the shards go to output_dir itself. Either way, shard files whose names are not in
    this plan (another shard count, a split now empty) and `.incomplete` files go, so a resumed run keeps
    only shards it may reuse. Only this converter's own files are ever removed (check_output_dir refused
    folders it did not write).
    """
    replacement = tf.io.gfile.join(output_dir, REPLACEMENT_FOLDER)
    if schema.has_manifest(output_dir):
        write_dir = replacement
        tf.io.gfile.makedirs(write_dir)
    else:
        write_dir = output_dir
        # Left by a swap that was interrupted: its shards are rewritten (or kept, once moved) in output_dir.
        remove_own_files(folder=replacement, keep=[], progress=True)
    remove_own_files(folder=write_dir, keep=planned_files, manifest_and_labels=False)
    return write_dir


def remove_own_files(*, folder: str, keep: list, manifest_and_labels: bool = True, progress: bool = False) -> None:
    """Removes this converter's own files from folder: its shards but those named in keep, `.incomplete`
    files, the manifest and labels (unless manifest_and_labels is off) and, with progress, its progress
    records and then the folder itself if that leaves it empty."""
    if not tf.io.gfile.exists(folder):
        return
    keep = set(keep)
    if manifest_and_labels:
        for name in (schema.MANIFEST_FILE, schema.LABELS_FILE):
            if tf.io.gfile.exists(tf.io.gfile.join(folder, name)):
                tf.io.gfile.remove(tf.io.gfile.join(folder, name))
    for split in schema.SPLITS:
        for suffix in ("", shards.INCOMPLETE_SUFFIX):
            for path in tf.io.gfile.glob(tf.io.gfile.join(folder, f"{split}-*-of-*.tfrecord{suffix}")):
                if suffix or path.rsplit("/", 1)[-1] not in keep:
                    tf.io.gfile.remove(path)
    if progress:
        remove_progress(output_dir=folder)
        if not tf.io.gfile.listdir(folder):
            tf.io.gfile.rmtree(folder)


def replace_finished(*, output_dir: str, write_dir: str, tasks: list) -> None:
    """Swaps a successful --overwrite conversion (in write_dir) in for the finished one in output_dir.

    The old manifest goes first, so an interruption leaves an unfinished conversion (a rerun rewrites what
    is missing), never a manifest naming shards that were replaced.
    """
    if write_dir == output_dir:
        return
    planned = [task.file for task in tasks]
    remove_own_files(folder=output_dir, keep=planned)
    tf.io.gfile.makedirs(tf.io.gfile.join(output_dir, shards.PROGRESS_FOLDER))
    for file in planned:
        tf.io.gfile.rename(tf.io.gfile.join(write_dir, file), tf.io.gfile.join(output_dir, file), overwrite=True)
        tf.io.gfile.rename(shards.record_path(write_dir, file), shards.record_path(output_dir, file), overwrite=True)
    remove_own_files(folder=write_dir, keep=[], progress=True)


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
    """Removes the per-shard progress records once the manifest holds everything they said.

    Only the converter's own files (`<shard>.json`, their `.incomplete` copies, the Beam planning job's
    BEAM_PLAN_FOLDER and the `plan-*.jsonl` of earlier versions) go;
    the folder goes too when that leaves it empty.
    """
    folder = tf.io.gfile.join(output_dir, shards.PROGRESS_FOLDER)
    if not tf.io.gfile.exists(folder):
        return
    for pattern in ("*.tfrecord.json", "*.tfrecord.json" + shards.INCOMPLETE_SUFFIX, "plan-*.jsonl"):
        for path in tf.io.gfile.glob(tf.io.gfile.join(folder, pattern)):
            tf.io.gfile.remove(path)
    if tf.io.gfile.isdir(tf.io.gfile.join(folder, BEAM_PLAN_FOLDER)):
        tf.io.gfile.rmtree(tf.io.gfile.join(folder, BEAM_PLAN_FOLDER))
    left = tf.io.gfile.listdir(folder)
    if left:
        logging.warning("Leaving %s in place: it holds files this converter did not write (%s)", folder, left[:3])
    else:
        tf.io.gfile.rmtree(folder)  # empty: nothing but the folder itself goes


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
