r"""Converts a folder of images into TFRecord shards with an Apache Beam pipeline (locally or on Dataflow).

    python -m tfrecords.beam_build --input_dir=/tmp/demo_images --output_dir=/tmp/demo_tfrecords_beam --runner=DirectRunner

On Google Cloud Dataflow, from the repository root (`pip install -e ".[beam]"` first; --setup_file
installs this package, TensorFlow included, on every worker):

    python -m tfrecords.beam_build --input_dir=gs://BUCKET/images --output_dir=gs://BUCKET/tfrecords \
        --max_side=320 --runner=DataflowRunner --project=PROJECT --region=us-central1 \
        --temp_location=gs://BUCKET/tmp --setup_file=./setup.py --max_num_workers=32

The same conversion as `python -m tfrecords.build`, with the same output: for the same input and flags
the shards, labels.txt and manifest.json are byte-identical (tests/test_beam_build.py checks it). This
machine lists, hashes, deduplicates and assigns files to shards exactly as tfrecords/build.py does
(build.prepare), writes the plan to `<output_dir>/_progress/plan-*.jsonl` (one shard task a line, so the
job graph stays small however many files there are), and waits while Beam runs one shards.write_shard
per task on the workers. Each worker writes its shard's progress record as the local converter does;
this machine then reads those records and writes the manifest (build.finish). A worker skips a shard
that an earlier, interrupted run already completed (same fingerprint and sha256), so a rerun with the
same flags resumes. Beam counters `tfrecords/shards_written`, `shards_reused`, `images_converted` and
`images_skipped` show the progress in the Dataflow console.

Arguments: absl parses this program's flags (those of tfrecords.build except --num_workers, which is
Dataflow's, and the --tfds_* flags: convert TFDS datasets with tfrecords.build); every other argument
goes to Beam's PipelineOptions: --runner, --project, --region, --temp_location, --setup_file or
--requirements_file, --num_workers, --max_num_workers, --machine_type, ... Write them as --name=value.
An argument that is neither a flag here nor a Beam option is an error (exit 2), so a typo is not ignored.
flags.txt records this program's flags only. The default --runner=DirectRunner first tries Beam's Prism
runner, which downloads its binary from GitHub once; offline, --runner=FnApiRunner is the in-process
Python runner it falls back to (the tests use it). For a fast local conversion use tfrecords.build.

Known limit: the hash pass reads every input file once on this machine (with all its cores). For
millions of files on gs:// that is hours; run this program on a VM in the bucket's region, or (not
done yet) make hashing and planning a Beam stage of its own.
"""

import concurrent.futures
import dataclasses
import json
import sys

from absl import app
from absl import flags
from absl import logging
import apache_beam as beam
from apache_beam.options import pipeline_options as beam_options
from apache_beam.runners import runner as beam_runner
import tensorflow as tf

from tfrecords import build
from tfrecords import images
from tfrecords import shards

FLAGS = flags.FLAGS
TASKS_PER_PLAN_FILE = 64
COUNTER_NAMESPACE = "tfrecords"
CONVERSION_FLAGS = [
    "input_dir", "output_dir", "validation_fraction", "test_fraction", "num_shards", "target_shard_mb", "seed",
    "overwrite", "max_side", "jpeg_quality", "max_skipped_fraction", "labels_csv",
]
READ_RECORD_THREADS = 16


def define_flags() -> None:
    """Defines this program's flags: tfrecords.build's conversion flags, same names, defaults and help."""
    build.define_conversion_flags()


def make_pipeline_options(arguments: list) -> beam_options.PipelineOptions:
    """Returns Beam's PipelineOptions from the arguments absl did not parse.

    Raises:
        ValueError: an argument is not a Beam pipeline option either (e.g. a mistyped flag).
    """
    options = beam_options.PipelineOptions(arguments)
    known = options.get_all_options()
    unknown = sorted(set(options.get_all_options(retain_unknown_options=True)) - set(known))
    if unknown:
        raise ValueError(
            f"--{unknown[0]} is neither a flag of tfrecords.beam_build (see --helpfull) nor an Apache Beam "
            "pipeline option; check its spelling"
        )
    return options


def build_with_beam(
    *, input_dir: str, output_dir: str, validation_fraction: float, test_fraction: float, num_shards: int,
    target_shard_mb: float, seed: int, overwrite: bool, max_side: int = 0,
    jpeg_quality: int = images.DEFAULT_JPEG_QUALITY, max_skipped_fraction: float = 0.01,
    labels_csv: str | None = None, pipeline_options: beam_options.PipelineOptions,
) -> dict:
    """Converts input_dir like tfrecords.build.build, with the shards written by a Beam pipeline.

    Args as tfrecords.build.build, and pipeline_options: where and how Beam runs (runner, project, ...).

    Returns:
        The manifest dict, as written to manifest.json.

    Raises:
        build.InputError: (a ValueError) the flags or the input are unusable; nothing was written.
        build.TooManySkippedError: too many undecodable files; shards were written, the manifest was not.
    """
    runner = pipeline_options.view_as(beam_options.StandardOptions).runner or "DirectRunner"
    if "Dataflow" in runner:
        for flag, path in (("input_dir", input_dir), ("output_dir", output_dir)):
            if path and not path.startswith("gs://"):
                raise build.InputError(
                    f"--{flag} {path!r} is not on gs://; Dataflow workers read and write Cloud Storage, not this "
                    "machine's disk"
                )
    # num_workers=0: the hash pass uses every core of this machine; the shards are Beam's work.
    conversion = build.prepare(
        input_dir=input_dir, output_dir=output_dir, validation_fraction=validation_fraction,
        test_fraction=test_fraction, num_shards=num_shards, target_shard_mb=target_shard_mb, seed=seed,
        overwrite=overwrite, num_workers=0, max_side=max_side, jpeg_quality=jpeg_quality,
        max_skipped_fraction=max_skipped_fraction, labels_csv=labels_csv,
    )
    records = write_shards(
        tasks=conversion.plan.tasks, output_dir=conversion.write_dir, max_side=max_side or None, jpeg_quality=jpeg_quality,
        classes=conversion.classes, pipeline_options=pipeline_options,
    )
    return build.finish(
        conversion=conversion, records=records, output_dir=output_dir, max_side=max_side, jpeg_quality=jpeg_quality,
        max_skipped_fraction=max_skipped_fraction,
    )


def write_shards(
    *, tasks: list, output_dir: str, max_side: int | None, jpeg_quality: int, classes: list,
    pipeline_options: beam_options.PipelineOptions,
) -> list:
    """Writes the shards of tasks with a Beam pipeline; returns every shard's record, in task order."""
    if not tasks:
        return []
    # The plan goes to files, not into the job graph (Dataflow limits its size); several files, so
    # several workers read it at once.
    progress_dir = tf.io.gfile.join(output_dir, shards.PROGRESS_FOLDER)
    tf.io.gfile.makedirs(progress_dir)
    plan_paths = []
    for start in range(0, len(tasks), TASKS_PER_PLAN_FILE):
        plan_paths.append(tf.io.gfile.join(progress_dir, f"plan-{start // TASKS_PER_PLAN_FILE:05d}.jsonl"))
        lines = [task_to_json(task) + "\n" for task in tasks[start : start + TASKS_PER_PLAN_FILE]]
        with tf.io.gfile.GFile(plan_paths[-1], "w") as plan_file:
            plan_file.write("".join(lines))
    pipeline = beam.Pipeline(options=pipeline_options)
    _ = (
        pipeline
        | "ListPlanFiles" >> beam.Create(plan_paths)
        | "ReadPlan" >> beam.FlatMap(read_plan_file)
        # Without it the runner may fuse reading a plan file with writing its shards, on one worker.
        | "Distribute" >> beam.Reshuffle()
        | "WriteShard" >> beam.Map(
            write_planned_shard, output_dir=output_dir, max_side=max_side, jpeg_quality=jpeg_quality, classes=classes
        )
    )
    logging.info("Running the Beam pipeline: %d shards", len(tasks))
    result = pipeline.run()
    state = result.wait_until_finish()
    if state != beam_runner.PipelineState.DONE:
        raise RuntimeError(f"the Beam pipeline ended in state {state}; rerun with the same flags to resume")
    with concurrent.futures.ThreadPoolExecutor(READ_RECORD_THREADS) as pool:
        return list(pool.map(lambda task: read_written_record(output_dir=output_dir, task=task), tasks))


def read_plan_file(path: str) -> list:
    """Returns the lines (one shard task each) of a plan file; runs on a Beam worker."""
    with tf.io.gfile.GFile(path, "r") as plan_file:
        return plan_file.read().splitlines()


def write_planned_shard(line: str, *, output_dir: str, max_side: int | None, jpeg_quality: int, classes: list) -> str:
    """Writes the shard of one plan line unless a complete one is there already; runs on a Beam worker.

    Returns:
        The shard's file name.
    """
    task = task_from_json(line)
    record = shards.read_complete_shard(output_dir=output_dir, task=task)
    if record is None:
        record = shards.write_shard((task, output_dir, max_side, jpeg_quality, classes))
        beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "shards_written").inc()
    else:
        beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "shards_reused").inc()
    beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "images_converted").inc(record["num_examples"])
    beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "images_skipped").inc(len(record["skipped"]))
    return task.file


def read_written_record(*, output_dir: str, task: shards.ShardTask) -> dict:
    """Returns the progress record a worker wrote for task, after checking it belongs to this plan."""
    with tf.io.gfile.GFile(shards.record_path(output_dir, task.file), "r") as record_file:
        record = json.load(record_file)
    shard_path = tf.io.gfile.join(output_dir, task.file)
    if record["fingerprint"] != task.fingerprint or tf.io.gfile.stat(shard_path).length != record["size_bytes"]:
        raise RuntimeError(f"{shard_path} does not match its plan after the pipeline; rerun with the same flags")
    return record


def task_to_json(task: shards.ShardTask) -> str:
    """Returns a file source's ShardTask as one line of JSON (the plan file's format)."""
    assert task.tfds is None, "TFDS sources are converted by tfrecords.build"
    return json.dumps(dataclasses.asdict(task), sort_keys=True)


def task_from_json(line: str) -> shards.ShardTask:
    """Returns the ShardTask of a line written by task_to_json."""
    fields = json.loads(line)
    return shards.ShardTask(
        split=fields["split"], file=fields["file"], fingerprint=fields["fingerprint"],
        images=tuple(shards.SourceImage(**image) for image in fields["images"]),
    )


def main(argv: list) -> int:
    try:
        pipeline_options = make_pipeline_options(argv[1:])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings = {name: FLAGS[name].value for name in CONVERSION_FLAGS}
    # In --flagfile syntax, so a run can be repeated with --flagfile=<output_dir>/flags.txt.
    flags_text = "".join(f"--{name}={value}\n" for name, value in settings.items() if value is not None)
    logging.info("Resolved flags:\n%sBeam pipeline options: %s", flags_text, " ".join(argv[1:]) or "(none)")
    try:
        manifest = build_with_beam(**settings, pipeline_options=pipeline_options)
    except build.InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except build.TooManySkippedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return build.report(manifest=manifest, flags_text=flags_text, output_dir=FLAGS.output_dir, input_dir=FLAGS.input_dir)


def run() -> None:
    """Entry point of `python -m tfrecords.beam_build`."""
    define_flags()
    # known_only: the arguments absl does not know are left in argv for Beam (see the module docstring).
    app.run(main, flags_parser=lambda argv: FLAGS(argv, known_only=True))


if __name__ == "__main__":
    # Run the imported module, not __main__: Beam pickles write_planned_shard by reference, and a
    # Dataflow worker can import tfrecords.beam_build (installed by --setup_file) but not our __main__.
    from tfrecords import beam_build

    beam_build.run()
