"""Converts a folder of images into TFRecord shards for the trainer.

    python -m tfrecords.build --input_dir=/tmp/demo_images --output_dir=/tmp/demo_tfrecords

(`python -m tfrecords.demo_images --output_dir=/tmp/demo_images` makes that small input folder.)

The input is either class folders (`<input_dir>/<class>/<image files>`, split here into train,
validation and test by a stable hash of each file's path) or already split folders
(`<input_dir>/train/<class>/...`, `<input_dir>/validation/<class>/...` or `val/`, optional `test/`).
See tfrecords/sources/folder.py for what is listed and what is ignored.

Or a CSV of `path,label` rows (--labels_csv), or a TFDS dataset (--tfds_name, tfrecords/sources/tfds_source.py).

The output folder (local or gs://) receives `<split>-%05d-of-%05d.tfrecord` shards in the format of
tfrecords/schema.py, `labels.txt` (one class name per line, line i is label id i), `flags.txt`, and
`manifest.json`, written last, which lists the shards (with sha256), the counts per class and every
skipped file with the reason. Files that are not decodable images, and exact duplicates, are skipped;
more undecodable files than --max_skipped_fraction fails the run (exit 1, no manifest).

This module reads the flags; tfrecords/run/conversion.py does the work: folder.py lists, plan.py hashes,
deduplicates and assigns files to shards, shards.py writes one shard (resumably), writer.py runs the
workers, schema.py writes labels and manifest; tfrecords/beam_build.py runs the same plan as an Apache Beam (Dataflow) pipeline, with the same output. A rerun of an interrupted
conversion (no manifest yet) with the same flags keeps the complete shards; check a finished one with
`python -m tfrecords.verify --data_dir=<output_dir>`.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from tfrecords import cli
from tfrecords.run import conversion

conversion.define_conversion_flags()
flags.DEFINE_integer(
    "num_workers",
    0,
    "Processes that decode and write shards (each writes whole shards). 0 uses all cores. The "
    "output is byte-identical whatever the number.",
)
flags.DEFINE_string(
    "tfds_name",
    None,
    "Convert a TensorFlow Datasets dataset instead of --input_dir, e.g. tf_flowers, "
    "oxford_flowers102, cassava (optionally name:version).",
)
flags.DEFINE_string(
    "tfds_data_dir",
    None,
    "TFDS data folder (local or gs://); default ~/tensorflow_datasets. Downloaded and prepared there "
    "if missing.",
)
flags.DEFINE_string(
    "tfds_splits",
    "",
    "With --tfds_name: comma-separated <our split>=<TFDS split> pairs, e.g. "
    "train=train[:80%],validation=train[80%:]. Empty uses the dataset's train/validation/test splits, "
    "and splits a dataset that has only `train` by --validation_fraction and --test_fraction.",
)
FLAGS = flags.FLAGS


def main(argv: list) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    names = [
        "input_dir", "output_dir", "validation_fraction", "test_fraction", "num_shards", "target_shard_mb",
        "seed", "overwrite", "num_workers", "max_side", "jpeg_quality", "max_skipped_fraction", "labels_csv",
        "file_list", "tfds_name", "tfds_data_dir", "tfds_splits",
    ]
    # In --flagfile syntax, so a run can be repeated with --flagfile=<output_dir>/flags.txt.
    flags_text = "".join(f"--{name}={FLAGS[name].value}\n" for name in names if FLAGS[name].value is not None)
    logging.info("Resolved flags:\n%s", flags_text)
    try:
        source = conversion.Source(
            input_dir=FLAGS.input_dir, labels_csv=FLAGS.labels_csv, file_list=FLAGS.file_list,
            tfds_name=FLAGS.tfds_name,
            tfds_data_dir=FLAGS.tfds_data_dir, tfds_splits=FLAGS.tfds_splits,
        )
        options = conversion.ConversionOptions(
            validation_fraction=FLAGS.validation_fraction, test_fraction=FLAGS.test_fraction,
            num_shards=FLAGS.num_shards, target_shard_mb=FLAGS.target_shard_mb, seed=FLAGS.seed,
            overwrite=FLAGS.overwrite, num_workers=FLAGS.num_workers, max_side=FLAGS.max_side,
            jpeg_quality=FLAGS.jpeg_quality, max_skipped_fraction=FLAGS.max_skipped_fraction,
        )
        manifest = conversion.build(source, FLAGS.output_dir, options)
    except conversion.InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except conversion.TooManySkippedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return conversion.report(manifest=manifest, flags_text=flags_text, output_dir=FLAGS.output_dir,
                             input_dir=FLAGS.input_dir)


def run() -> None:
    """Entry point of `python -m tfrecords.build` and of the `tfrecords.build` console script."""
    app.run(cli.frozen_heap(main), flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
