"""Converts a folder of images into TFRecord shards for the trainer.

    python -m tfrecords.build --input_dir=/tmp/demo_images --output_dir=/tmp/demo_tfrecords

(`python -m tfrecords.demo_images --output_dir=/tmp/demo_images` makes that small input folder.)

The input is either class folders (`<input_dir>/<class>/<image files>`, split here into train,
validation and test by a stable hash of each file's path) or already split folders
(`<input_dir>/train/<class>/...`, `<input_dir>/validation/<class>/...` or `val/`, optional `test/`).
See tfrecords/folder.py for what is listed and what is ignored.

The output folder (local or gs://) receives `<split>-%05d-of-%05d.tfrecord` shards in the format of
tfrecords/schema.py, `labels.txt` (one class name per line, line i is label id i), `flags.txt`, and
`manifest.json`, written last, which lists the shards, the counts per class and every skipped file with
the reason. Files that are not decodable images are skipped, never fatal.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from tfrecords import folder
from tfrecords import schema
from tfrecords import writer

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this program's flags.

    Called by run(), not at import: tests and trainer code import build() next to trainer.train, which
    defines its own --seed, and absl refuses a flag name defined twice.
    """
    flags.DEFINE_string(
        "input_dir",
        None,
        "Image folder, local or gs://: <input_dir>/<class>/<image files>, or pre-split "
        "<input_dir>/{train,validation|val,test}/<class>/<image files>.",
    )
    flags.DEFINE_string(
        "output_dir",
        None,
        "Folder for the shards, labels.txt and manifest.json, local or gs://; created if missing.",
    )
    flags.DEFINE_float(
        "validation_fraction",
        0.2,
        "Share of the files that goes to the validation split. Used only for class folders; "
        "pre-split folders keep their splits.",
    )
    flags.DEFINE_float(
        "test_fraction",
        0.1,
        "Share of the files that goes to the test split (0 for none). Used only for class folders; "
        "pre-split folders keep their splits.",
    )
    flags.DEFINE_integer(
        "num_shards",
        0,
        "Shards per split. 0 picks the number from --target_shard_mb.",
    )
    flags.DEFINE_float(
        "target_shard_mb",
        100,
        "With --num_shards=0, aim at shards of about this many MiB (of source files). 100 to 200 MiB "
        "reads well from gs://.",
    )
    flags.DEFINE_integer(
        "seed",
        42,
        "Seed of the train/validation/test assignment and of the example order. Keep it fixed so files "
        "keep their split across reruns.",
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace an earlier conversion in --output_dir. Without it, an --output_dir that already has a "
        "manifest.json is refused.",
    )
    flags.mark_flag_as_required("input_dir")
    flags.mark_flag_as_required("output_dir")


class InputError(ValueError):
    """A problem with the flags or the input folder, found before anything is written."""


def build(
    *,
    input_dir: str,
    output_dir: str,
    validation_fraction: float,
    test_fraction: float,
    num_shards: int,
    target_shard_mb: float,
    seed: int,
    overwrite: bool,
) -> dict:
    """Converts input_dir into TFRecord shards, labels.txt and manifest.json in output_dir.

    Args:
        input_dir: image folder, local or gs://, in one of the layouts of tfrecords/folder.py.
        output_dir: output folder, local or gs://; created if missing.
        validation_fraction: share of files for validation (class-folder layout only).
        test_fraction: share of files for test (class-folder layout only).
        num_shards: shards per split; 0 picks the number from target_shard_mb.
        target_shard_mb: automatic shard size, in MiB of source files.
        seed: seed of the split assignment and of the example order.
        overwrite: replace an earlier conversion in output_dir instead of refusing.

    Returns:
        The manifest dict, as written to manifest.json.

    Raises:
        InputError: (a ValueError) the flags or the input folder are unusable; nothing was written.
    """
    # Only this validation step turns ValueErrors into InputError: a ValueError raised while writing
    # is a bug and must keep its traceback.
    try:
        _check_output_dir(output_dir=output_dir, overwrite=overwrite)
        _check_shard_settings(num_shards=num_shards, target_shard_mb=target_shard_mb)
        listing = folder.list_images(
            input_dir=input_dir,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )
    except ValueError as error:
        raise InputError(str(error)) from error

    tf.io.gfile.makedirs(output_dir)
    if overwrite:
        writer.remove_previous_output(output_dir=output_dir)
    splits = {}
    skipped = []
    for split in schema.SPLITS:
        split_files = [source_file for source_file in listing.files if source_file.split == split]
        if not split_files:
            continue
        logging.info("Writing %d files of split %r", len(split_files), split)
        splits[split], split_skipped = writer.write_split(
            split=split,
            files=split_files,
            classes=listing.classes,
            output_dir=output_dir,
            num_shards=num_shards,
            target_shard_mb=target_shard_mb,
            seed=seed,
        )
        skipped.extend(split_skipped)
    writer.write_labels(output_dir=output_dir, classes=listing.classes)
    manifest = writer.make_manifest(
        input_dir=input_dir,
        layout=listing.layout,
        seed=seed,
        validation_fraction=validation_fraction,
        test_fraction=test_fraction,
        classes=listing.classes,
        splits=splits,
        skipped=sorted(skipped, key=lambda entry: entry["path"]),
    )
    writer.write_manifest(output_dir=output_dir, manifest=manifest)
    return manifest


def summarize(*, manifest: dict, output_dir: str) -> str:
    """Returns the one-line summary printed at the end of a run."""
    converted = sum(split["num_examples"] for split in manifest["splits"].values())
    per_split = ", ".join(f"{name} {split['num_examples']}" for name, split in manifest["splits"].items())
    manifest_path = tf.io.gfile.join(output_dir, schema.MANIFEST_FILE)
    return (
        f"converted {converted}, skipped {len(manifest['skipped'])} (see {manifest_path}): "
        f"{per_split or 'no examples'}"
    )


def _check_output_dir(*, output_dir: str, overwrite: bool) -> None:
    manifest_path = tf.io.gfile.join(output_dir, schema.MANIFEST_FILE)
    if not overwrite and tf.io.gfile.exists(manifest_path):
        raise ValueError(
            f"--output_dir {output_dir!r} already holds a conversion ({schema.MANIFEST_FILE}); "
            "pass --overwrite to replace it, or choose another --output_dir"
        )


def _check_shard_settings(*, num_shards: int, target_shard_mb: float) -> None:
    if num_shards < 0:
        raise ValueError(f"--num_shards={num_shards} is negative; use 0 (automatic) or a positive count")
    if num_shards == 0 and target_shard_mb <= 0:
        raise ValueError(
            f"--target_shard_mb={target_shard_mb} must be positive when --num_shards=0; e.g. 100"
        )


def main(argv: list) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    settings = {
        "input_dir": FLAGS.input_dir,
        "output_dir": FLAGS.output_dir,
        "validation_fraction": FLAGS.validation_fraction,
        "test_fraction": FLAGS.test_fraction,
        "num_shards": FLAGS.num_shards,
        "target_shard_mb": FLAGS.target_shard_mb,
        "seed": FLAGS.seed,
        "overwrite": FLAGS.overwrite,
    }
    # In --flagfile syntax, so a run can be repeated with --flagfile=<output_dir>/flags.txt.
    flags_text = "".join(f"--{name}={value}\n" for name, value in settings.items())
    logging.info("Resolved flags:\n%s", flags_text)
    try:
        manifest = build(**settings)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with tf.io.gfile.GFile(tf.io.gfile.join(FLAGS.output_dir, "flags.txt"), "w") as flags_file:
        flags_file.write(flags_text)
    print(summarize(manifest=manifest, output_dir=FLAGS.output_dir))
    if not manifest["splits"]:
        print(
            f"error: none of the files in --input_dir {FLAGS.input_dir!r} could be read as an image; "
            "the reasons are in the manifest's 'skipped' list",
            file=sys.stderr,
        )
        return 1
    return 0


def run() -> None:
    """Entry point of `python -m tfrecords.build` and of the `tfrecords.build` console script."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
