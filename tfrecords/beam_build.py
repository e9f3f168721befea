r"""Converts a folder of images into TFRecord shards with an Apache Beam pipeline (locally or on Dataflow).

    python -m tfrecords.beam_build --input_dir=/tmp/demo_images --output_dir=/tmp/demo_tfrecords_beam --runner=DirectRunner

On Google Cloud Dataflow, from the repository root (`pip install -e ".[beam]"` first; --setup_file
installs this package, TensorFlow included, on every worker):

    python -m tfrecords.beam_build --input_dir=gs://BUCKET/images --output_dir=gs://BUCKET/tfrecords \
        --max_side=320 --runner=DataflowRunner --project=PROJECT --region=us-central1 \
        --temp_location=gs://BUCKET/tmp --setup_file=./setup.py --max_num_workers=32

The same conversion as `python -m tfrecords.build`, with the same output: for the same input and flags
the shards, labels.txt and manifest.json are byte-identical (tests/test_beam_pipeline.py and
tests/test_beam_plan.py check it). A planning job lists, hashes, deduplicates and assigns the files to shards on
the workers (tfrecords/beam/planning.py), with tfrecords/writing/plan.py's own functions; this machine checks its summary
(refusing what tfrecords.build refuses, before any shard is written); a writing job writes one shard per task
(tfrecords/beam/pipeline.py); this machine then writes the manifest. This machine's own time and memory do not
grow with the number of files for a gs:// folder or a --file_list (it lists class folders, or splits the list
into byte ranges); a local folder or a --labels_csv is listed here. A worker skips a shard that an earlier,
interrupted run already completed (same fingerprint and sha256), so a rerun with the same flags resumes.
Beam counters `tfrecords/shards_written`, `shards_reused`, `images_converted` and `images_skipped` show the
progress in the Dataflow console.

Arguments: absl parses this program's flags (those of tfrecords.build except --num_workers, which is
Dataflow's, and the --tfds_* flags: convert TFDS datasets with tfrecords.build); every other argument
goes to Beam's PipelineOptions: --runner, --project, --region, --temp_location, --setup_file or
--requirements_file, --num_workers, --max_num_workers, --machine_type, ... Write them as --name=value.
An argument that is neither a flag here nor a Beam option is an error (exit 2), so a typo is not ignored.
flags.txt records this program's flags only. The default --runner=DirectRunner first tries Beam's Prism
runner, which downloads its binary from GitHub once; offline, --runner=FnApiRunner is the in-process
Python runner it falls back to (the tests use it). For a fast local conversion use tfrecords.build.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from tfrecords.beam import pipeline
from tfrecords.run import conversion

CONVERSION_FLAGS = [
    "input_dir", "output_dir", "validation_fraction", "test_fraction", "num_shards", "target_shard_mb", "seed",
    "overwrite", "max_side", "jpeg_quality", "max_skipped_fraction", "labels_csv", "file_list",
]
# tfrecords.build's conversion flags, same names, defaults and help.
conversion.define_conversion_flags()
FLAGS = flags.FLAGS


def main(argv: list) -> int:
    try:
        pipeline_options = pipeline.make_pipeline_options(argv[1:])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # In --flagfile syntax, so a run can be repeated with --flagfile=<output_dir>/flags.txt.
    flags_text = "".join(f"--{name}={FLAGS[name].value}\n" for name in CONVERSION_FLAGS if FLAGS[name].value is not None)
    logging.info("Resolved flags:\n%sBeam pipeline options: %s", flags_text, " ".join(argv[1:]) or "(none)")
    try:
        source = conversion.Source(input_dir=FLAGS.input_dir, labels_csv=FLAGS.labels_csv, file_list=FLAGS.file_list)
        options = conversion.ConversionOptions(
            validation_fraction=FLAGS.validation_fraction, test_fraction=FLAGS.test_fraction,
            num_shards=FLAGS.num_shards, target_shard_mb=FLAGS.target_shard_mb, seed=FLAGS.seed,
            overwrite=FLAGS.overwrite, max_side=FLAGS.max_side, jpeg_quality=FLAGS.jpeg_quality,
            max_skipped_fraction=FLAGS.max_skipped_fraction,
        )
        manifest = pipeline.build_with_beam(source, FLAGS.output_dir, options, pipeline_options)
    except conversion.InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except conversion.TooManySkippedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return conversion.report(manifest=manifest, flags_text=flags_text, output_dir=FLAGS.output_dir, input_dir=FLAGS.input_dir)


def run() -> None:
    """Entry point of `python -m tfrecords.beam_build`."""
    # known_only: the arguments absl does not know are left in argv for Beam (see the module docstring).
    app.run(main, flags_parser=lambda argv: FLAGS(argv, known_only=True))


if __name__ == "__main__":
    run()
