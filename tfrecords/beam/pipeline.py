"""The Beam (Dataflow) converter's jobs: the work of `python -m tfrecords.beam_build`.

Two Beam jobs, with this machine's part between them small whatever the number of files:
1. Planning (tfrecords/beam/planning.py): the workers list, hash and deduplicate the files and assign them to
   shards with the local converter's own functions, writing one task file per shard and a summary.
2. This machine reads the summary, refuses what tfrecords.build refuses (a class left empty, a bad file
   list) before any shard is written, and readies the output folder.
3. Writing: one shards.write_shard per task on the workers; then this machine reads the workers' progress
   records and writes the manifest (conversion.finish).
Beam pickles the functions a worker runs by reference, so they live in modules a Dataflow worker can import.
"""

import concurrent.futures
import json

from absl import logging
import apache_beam as beam
from apache_beam.options import pipeline_options as beam_options
from apache_beam.runners import runner as beam_runner
import tensorflow as tf

from tfrecords.beam import planning
from tfrecords.run import conversion
from tfrecords.sources import folder
from tfrecords.writing import plan
from tfrecords.writing import shards
from tfrecords.writing import writer

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
    """Converts source.input_dir like conversion.build, with the planning and the shards done by Beam jobs.

    Args as conversion.build, and pipeline_options: where and how Beam runs (runner, project, ...).

    Returns:
        The manifest dict, as written to manifest.json.

    Raises:
        conversion.InputError: (a ValueError) the flags or the input are unusable; no shard was written.
        conversion.TooManySkippedError: too many undecodable files; shards were written, the manifest was not.
    """
    runner = pipeline_options.view_as(beam_options.StandardOptions).runner or "DirectRunner"
    if "Dataflow" in runner:
        for flag, path in (("input_dir", source.input_dir), ("output_dir", output_dir), ("file_list", source.file_list)):
            if path and not path.startswith("gs://"):
                raise conversion.InputError(
                    f"--{flag} {path!r} is not on gs://; Dataflow workers read and write Cloud Storage, not this "
                    "machine's disk"
                )
    if source.tfds_name:
        raise conversion.InputError("--tfds_name is converted by tfrecords.build, not by the Beam converter")
    prepared = prepare_with_beam(source, output_dir, options, pipeline_options)
    records = write_shards(
        tasks=prepared.plan.tasks, plan_dir=plan_folder(output_dir), output_dir=prepared.write_dir,
        max_side=options.max_side or None, jpeg_quality=options.jpeg_quality, classes=prepared.classes,
        pipeline_options=pipeline_options,
    )
    return conversion.finish(conversion=prepared, records=records, output_dir=output_dir, options=options)


def plan_folder(output_dir: str) -> str:
    """Where the planning job writes its task files and summary."""
    return tf.io.gfile.join(output_dir, shards.PROGRESS_FOLDER, planning.PLAN_FOLDER)


def prepare_with_beam(
    source: conversion.Source, output_dir: str, options: conversion.ConversionOptions, pipeline_options,
) -> conversion.Conversion:
    """conversion.prepare with the planning done by the Beam planning job; the plan's tasks name their shards
    only (the workers read each shard's images from its task file).

    Raises:
        conversion.InputError: the flags or the input are unusable; no shard was written, and the planning
            job's files are removed again.
    """
    try:
        writer.check_output_dir(output_dir=output_dir, overwrite=options.overwrite, input_dir=source.input_dir)
    except ValueError as error:
        raise conversion.InputError(str(error)) from error
    existed = tf.io.gfile.exists(output_dir)
    plan_dir = plan_folder(output_dir)
    if tf.io.gfile.exists(plan_dir):
        tf.io.gfile.rmtree(plan_dir)  # an earlier run's plan: made again, identical
    tf.io.gfile.makedirs(plan_dir)
    # Only the listing and the checks turn ValueErrors into InputError: one raised inside a job is a bug.
    try:
        listing = planning.make_listing(source, options, plan_dir)
    except ValueError as error:
        _discard_plan(output_dir=output_dir, plan_dir=plan_dir, existed=existed)
        raise conversion.InputError(str(error)) from error
    summary = planning.plan_with_beam(
        source=source, options=options, listing=listing, plan_dir=plan_dir, pipeline_options=pipeline_options,
    )
    label_conflicts = listing.label_conflicts + summary["label_conflicts"]
    try:
        _check_summary(summary=summary, source=source, label_conflicts=label_conflicts)
    except ValueError as error:
        _discard_plan(output_dir=output_dir, plan_dir=plan_dir, existed=existed)
        raise conversion.InputError(str(error)) from error
    tasks = [shards.ShardTask(split=entry["split"], file=entry["file"], source=None, fingerprint=entry["fingerprint"])
             for entry in summary["shards"]]
    shard_plan = plan.Plan(tasks=tasks, skipped=listing.skipped + summary["skipped"], label_conflicts=label_conflicts)
    writer.claim_output_dir(output_dir)
    write_dir = writer.prepare_output_dir(output_dir=output_dir, planned_files=[task.file for task in tasks])
    num_sources = sum(summary["listed_counts"].values()) + summary["num_listing_skipped"] + len(listing.skipped)
    return conversion.Conversion(
        classes=summary["classes"], source=conversion.describe_source(source, options, layout=summary["layout"]),
        plan=shard_plan, num_sources=num_sources, write_dir=write_dir,
    )


def _check_summary(*, summary: dict, source: conversion.Source, label_conflicts: list) -> None:
    """Raises the ValueError tfrecords.build would raise for this listing and plan, if any.

    label_conflicts: the listing's (links between class folders) and the planning job's (copies).
    """
    if summary["errors"]:
        raise ValueError(summary["errors"][0])
    folder.check_classes(class_names=summary["classes"], input_dir=source.input_dir, file_list=source.file_list)
    folder.check_has_files(num_files=sum(summary["listed_counts"].values()), input_dir=source.input_dir)
    conversion.check_classes_kept(
        classes=summary["classes"], listed_counts=summary["listed_counts"], kept_counts=summary["kept_counts"],
        label_conflicts=label_conflicts,
    )


def _discard_plan(*, output_dir: str, plan_dir: str, existed: bool) -> None:
    """Removes the planning job's files after a refusal (and output_dir itself if this run created it)."""
    tf.io.gfile.rmtree(plan_dir)
    progress_dir = tf.io.gfile.join(output_dir, shards.PROGRESS_FOLDER)
    if not tf.io.gfile.listdir(progress_dir):
        tf.io.gfile.rmtree(progress_dir)
    if not existed and not tf.io.gfile.listdir(output_dir):
        tf.io.gfile.rmtree(output_dir)


def write_shards(
    *, tasks: list, plan_dir: str, output_dir: str, max_side: int | None, jpeg_quality: int, classes: list,
    pipeline_options: beam_options.PipelineOptions,
) -> list:
    """Writes the shards of tasks (from their task files in plan_dir) with a Beam job; returns every shard's
    record, in task order."""
    if not tasks:
        return []
    pipeline = beam.Pipeline(options=pipeline_options)
    _ = (
        pipeline
        | "ListShards" >> beam.Create([task.file for task in tasks])
        # Without it the runner may fuse the shards of one bundle onto one worker.
        | "Distribute" >> beam.Reshuffle()
        | "WriteShard" >> beam.Map(
            write_planned_shard, plan_dir=plan_dir, output_dir=output_dir, max_side=max_side, jpeg_quality=jpeg_quality,
            classes=classes,
        )
    )
    logging.info("Running the Beam writing job: %d shards", len(tasks))
    state = pipeline.run().wait_until_finish()
    if state != beam_runner.PipelineState.DONE:
        raise RuntimeError(f"the Beam pipeline ended in state {state}; rerun with the same flags to resume")
    with concurrent.futures.ThreadPoolExecutor(READ_RECORD_THREADS) as pool:
        return list(pool.map(lambda task: read_written_record(output_dir=output_dir, task=task), tasks))


def write_planned_shard(
    file: str, *, plan_dir: str, output_dir: str, max_side: int | None, jpeg_quality: int, classes: list,
) -> str:
    """Writes the shard `file` from its task file unless a complete one is there already; runs on a Beam worker.

    Returns:
        The shard's file name.
    """
    with tf.io.gfile.GFile(tf.io.gfile.join(plan_dir, file + ".json"), "r") as task_file:
        task = planning.task_from_json(task_file.read())
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
