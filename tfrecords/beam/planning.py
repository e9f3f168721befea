"""The Beam converter's planning job: the workers list, hash, deduplicate and assign the files to shards.

The launching machine only decides what there is to list, in time and memory that do not grow with the
number of files:
- a --file_list: byte ranges of the list (FILE_LIST_RANGE_BYTES each); the workers read their ranges, and
  the layout and classes come from the paths, as tfrecords.build takes them (folder.path_layout);
- a gs:// folder: its class folders (folder.find_roots lists the top level and the split folders); each
  worker walks some of them;
- a local folder or a --labels_csv: the listing itself, made here exactly as tfrecords.build makes it (a
  local folder's link policy needs one view of the whole folder; local folders are for local runners);
  written to plan files that the workers read.
Then every step is one of tfrecords/writing/plan.py's functions run as a Beam stage: hash_file on each file,
resolve_copies on each group of files with the same sha256, count_shards on each split's totals, shard_of
on each file and make_task on each shard's group. So the shards are the local converter's, byte for byte.

Outputs, in `<output_dir>/_progress/plan/`: one `<shard>.json` per shard (its task, as
tfrecords/beam/pipeline.py's writing job reads it) and SUMMARY_FILE, everything the launcher needs to
check and describe the conversion without the per-file plan: classes, layout, per-class counts, the
skipped files, label conflicts, refusals, and the shards' names and fingerprints.
"""

import dataclasses
import json

import apache_beam as beam
from apache_beam.runners import runner as beam_runner
import tensorflow as tf

from tfrecords import names
from tfrecords import schema
from tfrecords.run import conversion
from tfrecords.sources import folder
from tfrecords.writing import plan
from tfrecords.writing import shards
from tfrecords.writing import writer

PLAN_FOLDER = writer.BEAM_PLAN_FOLDER  # under <output_dir>/_progress
SUMMARY_FILE = "summary.json"
FILE_LIST_RANGE_BYTES = 16 * 2**20
FILE_LIST_TAIL_BYTES = 64 * 2**10  # read at a time to finish the last line of a range
LISTED_FILES_PER_PLAN_FILE = 10_000


@dataclasses.dataclass(frozen=True)
class Listing:
    """What the launcher decided about the input before any worker runs (see the module docstring).

    Attributes:
        kind: "file_list", "roots" (a gs:// folder's class folders) or "listed" (listed here).
        layout: folder.LAYOUT_* when known here; None for a file list (the workers find it).
        classes: class names in label order, when known here; None for a file list.
        items: the file list's (start, end) byte ranges, the roots' (relative root, class name, split), or
            the plan files holding the listed files.
        skipped, label_conflicts: found by a listing made here.
        columns: a CSV file list's (path, bucket) columns (folder.file_list_columns); None otherwise.
    """

    kind: str
    layout: str | None
    classes: list | None
    items: list
    skipped: list = dataclasses.field(default_factory=list)
    label_conflicts: list = dataclasses.field(default_factory=list)
    columns: tuple | None = None


def make_listing(source: conversion.Source, options: conversion.ConversionOptions, plan_dir: str) -> Listing:
    """Decides what the workers list (this machine's share of the listing).

    Raises:
        ValueError: the input folder or the file list is unusable.
    """
    folder.check_fractions(validation_fraction=options.validation_fraction, test_fraction=options.test_fraction)
    if not tf.io.gfile.isdir(source.input_dir):
        raise ValueError(
            f"--input_dir {source.input_dir!r} does not exist or is not a folder; expected <input_dir>/<class>/<image files>"
        )
    if source.file_list and not source.labels_csv and not names.is_local(source.input_dir):
        folder.check_file_list(source.file_list)
        size = tf.io.gfile.stat(source.file_list).length
        ranges = [(start, min(start + FILE_LIST_RANGE_BYTES, size)) for start in range(0, size, FILE_LIST_RANGE_BYTES)]
        header = _read_lines((0, 1), path=source.file_list, header=False)  # a CSV's header: the first line
        columns = folder.file_list_columns(source.file_list, header[0] if header else "")
        return Listing(kind="file_list", layout=None, classes=None, items=ranges, columns=columns)
    if not source.labels_csv and not names.is_local(source.input_dir):
        layout, roots = folder.find_roots(source.input_dir)
        classes = sorted({class_name for class_name, _ in roots.values()})
        folder.check_classes(class_names=classes, input_dir=source.input_dir)
        items = [(root, class_name, split) for root, (class_name, split) in roots.items()]
        return Listing(kind="roots", layout=layout, classes=classes, items=items)
    listed = folder.list_images(
        input_dir=source.input_dir, validation_fraction=options.validation_fraction,
        test_fraction=options.test_fraction, seed=options.seed, labels_csv=source.labels_csv,
        file_list=source.file_list,
    )
    paths = []
    for start in range(0, len(listed.files), LISTED_FILES_PER_PLAN_FILE):
        paths.append(tf.io.gfile.join(plan_dir, f"listed-{start // LISTED_FILES_PER_PLAN_FILE:05d}.jsonl"))
        chunk = listed.files[start : start + LISTED_FILES_PER_PLAN_FILE]
        lines = [json.dumps(dataclasses.asdict(file)) + "\n" for file in chunk]
        schema.write_text(paths[-1], "".join(lines))
    return Listing(
        kind="listed", layout=listed.layout, classes=listed.classes, items=paths, skipped=listed.skipped,
        label_conflicts=listed.label_conflicts,
    )


def plan_with_beam(
    *, source: conversion.Source, options: conversion.ConversionOptions, listing: Listing, plan_dir: str,
    pipeline_options,
) -> dict:
    """Runs the planning job; returns its summary (also written to plan_dir/SUMMARY_FILE).

    Raises:
        RuntimeError: the job did not finish.
    """
    pipeline = beam.Pipeline(options=pipeline_options)
    if listing.kind == "file_list":
        files, listing_skipped, errors, layout = _list_file_list(pipeline, source, options, listing)
    else:
        files, listing_skipped, errors, layout = _list_known(pipeline, source, options, listing)
    classes = layout | "Labels" >> beam.Map(lambda found: {name: label for label, name in enumerate(found["classes"])})
    # Hashing waits for the listing's refusals: a bad file list costs a listing, not a read of every file.
    hashed = (
        files
        | "Label" >> beam.Map(lambda file, labels: dataclasses.replace(file, label=labels[file.class_name]),
                              labels=beam.pvalue.AsSingleton(classes))
        | "Spread" >> beam.Reshuffle()
        | "Hash" >> beam.FlatMap(_hash, errors=beam.pvalue.AsList(errors)).with_outputs("unreadable", main="hashed")
    )
    resolved = (
        hashed.hashed
        | "ByContent" >> beam.Map(lambda file: (file.digest, file))
        | "GroupCopies" >> beam.GroupByKey()
        | "ResolveCopies" >> beam.MapTuple(lambda _, copies: plan.resolve_copies(list(copies)))
    )
    kept = resolved | "Kept" >> beam.MapTuple(lambda first, duplicates, conflict: first)
    duplicates = resolved | "Duplicates" >> beam.FlatMapTuple(lambda first, duplicates, conflict: duplicates)
    conflicts = resolved | "Conflicts" >> beam.FlatMapTuple(
        lambda first, duplicates, conflict: [conflict] if conflict else []
    )
    shard_entries = _plan_shards(kept, options=options, layout=layout, plan_dir=plan_dir)
    count_classes = beam.combiners.Count.PerElement
    _ = (
        pipeline
        | "Once" >> beam.Create([None])
        | "WriteSummary" >> beam.Map(
            _write_summary, plan_dir=plan_dir, layout=beam.pvalue.AsSingleton(layout),
            errors=beam.pvalue.AsList(errors),
            listed_counts=beam.pvalue.AsList(files | "ListedClass" >> beam.Map(lambda file: file.class_name)
                                             | "CountListed" >> count_classes()),
            kept_counts=beam.pvalue.AsList(kept | "KeptClass" >> beam.Map(lambda file: file.source_file.class_name)
                                           | "CountKept" >> count_classes()),
            skipped=beam.pvalue.AsList((listing_skipped, hashed.unreadable, duplicates) | "AllSkipped" >> beam.Flatten()),
            num_listing_skipped=beam.pvalue.AsSingleton(
                listing_skipped | "CountListingSkipped" >> beam.combiners.Count.Globally()
            ),
            label_conflicts=beam.pvalue.AsList(conflicts), shards=beam.pvalue.AsList(shard_entries),
        )
    )
    state = pipeline.run().wait_until_finish()
    if state != beam_runner.PipelineState.DONE:
        raise RuntimeError(f"the Beam planning job ended in state {state}; rerun with the same flags")
    with tf.io.gfile.GFile(tf.io.gfile.join(plan_dir, SUMMARY_FILE), "r") as summary_file:
        return json.load(summary_file)


def _plan_shards(kept, *, options: conversion.ConversionOptions, layout, plan_dir: str):
    """The stages from the kept files to one task file per shard; returns the summary's entries of the shards."""
    shard_counts = (
        kept
        | "SplitSizes" >> beam.Map(lambda file: (file.source_file.split, (1, file.size)))
        | "SplitTotals" >> beam.CombinePerKey(beam.combiners.TupleCombineFn(sum, sum))
        | "ShardCounts" >> beam.Map(_shard_count, options=options)
    )
    counts = beam.pvalue.AsDict(shard_counts)
    members = kept | "ChooseShard" >> beam.Map(_choose_shard, counts=counts, seed=options.seed)
    # Every shard of a split gets a task, also one that no file hashed into (it is written empty).
    every_shard = shard_counts | "EveryShard" >> beam.FlatMapTuple(
        lambda split, count: [((split, index), None) for index in range(count)]
    )
    return (
        (members, every_shard)
        | "AllShards" >> beam.Flatten()
        | "GroupShards" >> beam.GroupByKey()
        | "WriteTask" >> beam.Map(
            _write_task, counts=counts, layout=beam.pvalue.AsSingleton(layout), options=options, plan_dir=plan_dir
        )
    )


def _list_known(pipeline, source: conversion.Source, options: conversion.ConversionOptions, listing: Listing) -> tuple:
    """Listing stages when this machine knows the classes: (files, skipped, refusals, layout)."""
    known = {"layout": listing.layout, "classes": listing.classes, "error": None}
    layout = pipeline | "KnownLayout" >> beam.Create([known])
    skipped = pipeline | "ListingSkipped" >> beam.Create(listing.skipped)
    errors = pipeline | "NoRefusals" >> beam.Create([])
    items = pipeline | "ListingItems" >> beam.Create(listing.items) | "SpreadItems" >> beam.Reshuffle()
    if listing.kind == "roots":
        files = items | "WalkClassFolder" >> beam.FlatMap(_walk_root, input_dir=source.input_dir, options=options)
    else:
        files = items | "ReadListed" >> beam.FlatMap(_read_listed)
    return files, skipped, errors, layout


def _list_file_list(pipeline, source: conversion.Source, options: conversion.ConversionOptions, listing: Listing) -> tuple:
    """Listing stages of the --file_list of a remote input, as folder._list_file_list lists it: (files, skipped,
    refusals, layout). (A local input's list is read on this machine, where its links can be followed.)"""
    where = f"--file_list {source.file_list!r}"
    paths = (
        pipeline
        | "ListRanges" >> beam.Create(listing.items)
        | "SpreadRanges" >> beam.Reshuffle()
        | "ReadRange" >> beam.FlatMap(_read_lines, path=source.file_list, header=listing.columns is not None)
        | "ParseLine" >> beam.FlatMap(_parse_line, input_dir=source.input_dir, where=where, columns=listing.columns)
        .with_outputs("error", main="path")
    )
    unique = paths.path | "ListedOnce" >> beam.Distinct()
    top_folders = unique | "TopFolder" >> beam.Map(lambda path: path.split("/")[0]) | "TopFolders" >> beam.Distinct()
    deep_tops = (
        unique | "DeepPaths" >> beam.Filter(lambda path: path.count("/") >= 2)
        | "DeepTop" >> beam.Map(lambda path: path.split("/")[0]) | "DeepTops" >> beam.Distinct()
    )
    split_layout = (
        top_folders | "AllTopFolders" >> beam.combiners.ToList() | "SplitLayout" >> beam.Map(
            _split_layout, deep_tops=beam.pvalue.AsList(deep_tops), input_dir=source.input_dir, where=where)
    )
    entries = unique | "Entry" >> beam.FlatMap(
        _entry, split_layout=beam.pvalue.AsSingleton(split_layout)).with_outputs("skipped", main="entry")
    class_names = (
        entries.entry | "ClassOf" >> beam.MapTuple(lambda path, class_name, split: class_name)
        | "ClassNames" >> beam.Distinct() | "AllClassNames" >> beam.combiners.ToList()
    )
    layout = split_layout | "WithClasses" >> beam.Map(
        lambda found, names: {**found, "classes": sorted(names)}, names=beam.pvalue.AsSingleton(class_names)
    )
    files = entries.entry | "FileOf" >> beam.Map(lambda entry: _source_file(source.input_dir, *entry, options))
    skipped = entries.skipped
    layout_errors = layout | "LayoutError" >> beam.FlatMap(lambda found: [found["error"]] if found["error"] else [])
    errors = (paths.error, layout_errors) | "AllErrors" >> beam.Flatten()
    return files, skipped, errors, layout


def _read_lines(byte_range: tuple, *, path: str, header: bool) -> list:
    """The lines of a text file that start in byte_range [start, end) (the usual rule for splitting a text file),
    without the file's first line when it is a header. Lines end only at "\\n" (folder.decode_list_line):
    the file is read in bytes and split here, since GFile.readline() also drops every "\\r" inside a line."""
    start, end = byte_range
    offset = max(start - 1, 0)
    with tf.io.gfile.GFile(path, "rb") as text_file:
        text_file.seek(offset)
        data = text_file.read(end - offset)
        while data and not data.endswith(b"\n"):  # finish the last line that starts in the range
            more = text_file.read(FILE_LIST_TAIL_BYTES)
            if not more:
                break
            data += more[: more.find(b"\n") + 1] if b"\n" in more else more
    if start > 0:
        # A line belongs to the range its first byte is in: drop the line the previous range holds.
        data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # after the last line end
    if lines and start == 0:
        lines[0] = lines[0].removeprefix(folder.UTF8_BOM)  # as tfrecords.build reads it
    if header and start == 0:
        lines = lines[1:]
    return [folder.decode_list_line(line) for line in lines]


def _parse_line(line: str, *, input_dir: str, where: str, columns: tuple | None):
    try:
        path = folder.file_list_path(folder.file_list_entry(line, columns, where=where), input_dir=input_dir, where=where)
    except ValueError as error:
        yield beam.pvalue.TaggedOutput("error", str(error))
        return
    if path:
        yield path


def _split_layout(top_folders: list, *, deep_tops: list, input_dir: str, where: str) -> dict:
    try:
        pre_split, split_of_folder = folder.path_layout(set(top_folders), where=where)
        if pre_split:
            folder.check_split_folders(
                listed=set(top_folders) & set(split_of_folder), with_classes=set(deep_tops), input_dir=input_dir
            )
    except ValueError as error:
        return {"layout": folder.LAYOUT_CLASS_FOLDERS, "pre_split": False, "split_of_folder": {}, "error": str(error)}
    layout = folder.LAYOUT_PRE_SPLIT if pre_split else folder.LAYOUT_CLASS_FOLDERS
    return {"layout": layout, "pre_split": pre_split, "split_of_folder": split_of_folder, "error": None}


def _entry(path: str, *, split_layout: dict):
    entry = folder.path_entry(path, pre_split=split_layout["pre_split"], split_of_folder=split_layout["split_of_folder"])
    if entry == folder.LOOSE:
        yield beam.pvalue.TaggedOutput("skipped", {"path": path, "reason": folder.LOOSE_FILE_REASON})
    elif entry:
        yield (path, *entry)


def _walk_root(item: tuple, *, input_dir: str, options: conversion.ConversionOptions) -> list:
    root, class_name, split = item
    return [_source_file(input_dir, path, class_name, split, options) for path in folder.remote_files_under(input_dir, root)]


def _source_file(input_dir: str, path: str, class_name: str, split: str | None, options) -> plan.SourceFile:
    # The label is set once the classes are known (the "Label" stage).
    return folder.source_file_of(
        input_dir=input_dir, relative_path=path, class_name=class_name, label=-1, split=split, seed=options.seed,
        validation_fraction=options.validation_fraction, test_fraction=options.test_fraction,
    )


def _read_listed(path: str) -> list:
    with tf.io.gfile.GFile(path, "r") as listed_file:
        return [plan.SourceFile(**json.loads(line)) for line in listed_file.read().splitlines()]


def _hash(file: plan.SourceFile, *, errors: list):
    if errors:
        return
    digest, size = plan.hash_file(file.path)
    if digest is None:
        yield beam.pvalue.TaggedOutput("unreadable", plan.unreadable_entry(file, size))
    else:
        yield plan.HashedFile(file, digest, size)


def _shard_count(split_totals: tuple, *, options: conversion.ConversionOptions):
    split, (num_files, total_bytes) = split_totals
    count = plan.count_shards(
        num_files=num_files, total_bytes=total_bytes, num_shards=options.num_shards, target_shard_mb=options.target_shard_mb,
    )
    return split, count


# No "-> tuple" here: Beam would take it as the output's type, and GroupByKey wants a (key, value) pair.
def _choose_shard(file: plan.HashedFile, *, counts: dict, seed: int):
    split = file.source_file.split
    return (split, plan.shard_of(seed=seed, relative_path=file.source_file.relative_path, num_shards=counts[split])), file


def _write_task(shard: tuple, *, counts: dict, layout: dict, options, plan_dir: str) -> dict:
    """Writes one shard's task to plan_dir; returns the summary's entry for it."""
    (split, index), members = shard
    settings = plan.ShardSettings(
        classes=layout["classes"], seed=options.seed, max_side=options.max_side or None, jpeg_quality=options.jpeg_quality,
    )
    task = plan.make_task(
        split=split, index=index, shard_count=counts[split], members=[file for file in members if file is not None],
        settings=settings,
    )
    schema.write_text(tf.io.gfile.join(plan_dir, task.file + ".json"), task_to_json(task))
    return {"split": task.split, "file": task.file, "fingerprint": task.fingerprint, "num_images": len(task.images)}


def _write_summary(_, *, plan_dir: str, layout: dict, errors: list, listed_counts: list, kept_counts: list,
                   skipped: list, label_conflicts: list, num_listing_skipped: int, shards: list) -> None:
    order = {split: index for index, split in enumerate(schema.SPLITS)}
    summary = {
        "layout": layout["layout"], "classes": layout["classes"], "errors": sorted(errors),
        "listed_counts": dict(sorted(listed_counts)), "kept_counts": dict(sorted(kept_counts)),
        "skipped": plan.sort_skipped(skipped), "num_listing_skipped": num_listing_skipped,
        "label_conflicts": plan.sort_conflicts(label_conflicts),
        "shards": sorted(shards, key=lambda entry: (order[entry["split"]], entry["file"])),
    }
    schema.write_text(tf.io.gfile.join(plan_dir, SUMMARY_FILE), json.dumps(summary))


def task_to_json(task: shards.ShardTask) -> str:
    """Returns a file source's ShardTask as JSON (a plan file's content)."""
    fields = {"split": task.split, "file": task.file, "fingerprint": task.fingerprint,
              "images": [dataclasses.asdict(image) for image in task.images]}
    return json.dumps(fields, sort_keys=True)


def task_from_json(text: str) -> shards.ShardTask:
    """Returns the ShardTask of a text written by task_to_json."""
    fields = json.loads(text)
    images = tuple(shards.SourceImage(**image) for image in fields["images"])
    return shards.ShardTask(
        split=fields["split"], file=fields["file"], fingerprint=fields["fingerprint"], source=plan.FileSource(images),
    )
