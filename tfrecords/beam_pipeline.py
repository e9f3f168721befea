"""The Beam (Dataflow) converter's pipeline: the work of `python -m tfrecords.beam_build`.

This machine plans exactly as the local converter does (conversion.prepare), writes the plan to
`<output_dir>/_progress/plan-*.jsonl` (one shard task a line, so the job graph stays small however many
files there are), and waits while Beam runs one shards.write_shard per task on the workers; then it reads
the workers' progress records and writes the manifest (conversion.finish). Beam pickles the functions a
worker runs by reference, so they live here, in a module a Dataflow worker can import.
"""

import concurrent.futures
import dataclasses
import json

from absl import logging
import apache_beam as beam
from apache_beam.options import pipeline_options as beam_options
from apache_beam.runners import runner as beam_runner
import tensorflow as tf

from tfrecords import conversion
from tfrecords import plan
from tfrecords import shards

TASKS_PER_PLAN_FILE = 64
COUNTER_NAMESPACE = "tfrecords"
READ_RECORD_THREADS = 16


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
    source: conversion.Source, output_dir: str, options: conversion.ConversionOptions,
    pipeline_options: beam_options.PipelineOptions,
) -> dict:
    """Converts source.input_dir like conversion.build, with the shards written by a Beam pipeline.

    Args as conversion.build, and pipeline_options: where and how Beam runs (runner, project, ...).

    Returns:
        The manifest dict, as written to manifest.json.

    Raises:
        conversion.InputError: (a ValueError) the flags or the input are unusable; nothing was written.
        conversion.TooManySkippedError: too many undecodable files; shards were written, the manifest was not.
    """
    runner = pipeline_options.view_as(beam_options.StandardOptions).runner or "DirectRunner"
    if "Dataflow" in runner:
        for flag, path in (("input_dir", source.input_dir), ("output_dir", output_dir)):
            if path and not path.startswith("gs://"):
                raise conversion.InputError(
                    f"--{flag} {path!r} is not on gs://; Dataflow workers read and write Cloud Storage, not this "
                    "machine's disk"
                )
    # num_workers=0: the hash pass uses every core of this machine; the shards are Beam's work.
    if source.tfds_name:
        raise conversion.InputError("--tfds_name is converted by tfrecords.build, not by the Beam converter")
    prepared = conversion.prepare(source, output_dir, dataclasses.replace(options, num_workers=0))
    records = write_shards(
        tasks=prepared.plan.tasks, output_dir=prepared.write_dir, max_side=options.max_side or None,
        jpeg_quality=options.jpeg_quality, classes=prepared.classes, pipeline_options=pipeline_options,
    )
    return conversion.finish(conversion=prepared, records=records, output_dir=output_dir, options=options)


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
    assert isinstance(task.source, plan.FileSource), "TFDS sources are converted by tfrecords.build"
    fields = {"split": task.split, "file": task.file, "fingerprint": task.fingerprint,
              "images": [dataclasses.asdict(image) for image in task.images]}
    return json.dumps(fields, sort_keys=True)


def task_from_json(line: str) -> shards.ShardTask:
    """Returns the ShardTask of a line written by task_to_json."""
    fields = json.loads(line)
    images = tuple(shards.SourceImage(**image) for image in fields["images"])
    return shards.ShardTask(
        split=fields["split"], file=fields["file"], fingerprint=fields["fingerprint"], source=plan.FileSource(images),
    )
