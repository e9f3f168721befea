"""Converts an image folder (or a TFDS dataset) into TFRecord shards: the work of `python -m tfrecords.build`.

Stages: folder.py lists, plan.py hashes, deduplicates and assigns files to shards, shards.py writes one
shard (resumably), writer.py runs the workers; finish() writes labels and manifest (schema.py). The Beam
converter (beam_pipeline.py) runs the same prepare() and finish() around its own shard writing.
"""

import collections
import dataclasses
import sys

from absl import flags
import tensorflow as tf

from tfrecords import schema
from tfrecords.sources import folder
from tfrecords.writing import images
from tfrecords.writing import plan
from tfrecords.writing import progress
from tfrecords.writing import writer

# The longer side images are stored at by default. Smaller images keep their bytes. benchmarks/pipeline.py
# (phone-size photos, 160 px, 2 cores): 1174 images/s against 337 as stored, 148 against 678 KB per image;
# a 4:3 photo keeps a 768 px short side, so training at up to 384 px with the default random crops (a
# quarter of the area or more) never upsamples.
DEFAULT_MAX_SIDE = 1024


def define_conversion_flags() -> None:
    """Defines the conversion flags of the two entry points, tfrecords/build.py and tfrecords/beam_build.py, at
    their import (beam_build has no --num_workers: Beam owns it). The only flags defined outside an entry
    module: two programs share them, with one help text. In two groups: what is read, and what is written."""
    _define_input_flags()
    _define_output_flags()
    flags.mark_flag_as_required("output_dir")


def _define_input_flags() -> None:
    """The input (--input_dir, or the files --labels_csv or --file_list name) and its split."""
    flags.DEFINE_string(
        "input_dir",
        None,
        "Image folder, local or gs://: <input_dir>/<class>/<image files>, or pre-split "
        "<input_dir>/{train,validation|val,test}/<class>/<image files>, or any files listed by "
        "--labels_csv. Not used with --tfds_name.",
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
        "seed",
        42,
        "Seed of the train/validation/test assignment and of the example order. Keep it fixed so files "
        "keep their split across reruns.",
    )
    flags.DEFINE_string(
        "labels_csv",
        None,
        "CSV file (local or gs://) of `path,label` rows, path relative to --input_dir, for datasets "
        "whose labels are not folder names. A first row `path,label` is a header. Splits as for class "
        "folders.",
    )
    flags.DEFINE_string(
        "file_list",
        None,
        "Text file (local or gs://) of the image files' paths, one per line, taken exactly as written (a line "
        "starting with / or gs:// is a full path under --input_dir, any other is relative to it; no comments), "
        "e.g. from gcloud storage ls 'gs://BUCKET/images/**', or a .csv whose header names the path column (path, name, "
        "key or object; with a bucket column the path is gs://<bucket>/<name>, as in a Cloud Storage inventory "
        "report); laid out as class folders or pre-split folders: --input_dir is then never walked, for buckets of "
        "millions of objects.",
    )


def _define_output_flags() -> None:
    """The output folder, its shards and how images are stored in them."""
    flags.DEFINE_string(
        "output_dir",
        None,
        "Folder for the shards, labels.txt and manifest.json, local or gs://; created if missing.",
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
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace an earlier conversion in --output_dir. Without it, an --output_dir that already has a "
        "manifest.json is refused.",
    )
    flags.DEFINE_integer(
        "max_side",
        DEFAULT_MAX_SIDE,
        "Downscale images whose longer side is larger, keeping the aspect, before storing: the default 1024 keeps "
        "every crop of training at up to 384 px unscaled and makes phone-size photos 6x faster to train on "
        "(docs/input-pipeline.md: Phone-size photos); 320 when training at 160 px is faster still; 0 keeps the original size.",
    )
    flags.DEFINE_integer(
        "jpeg_quality",
        images.DEFAULT_JPEG_QUALITY,
        "JPEG quality (1-95) of the images that are re-encoded: downscaled by --max_side, rotated upright, "
        "or not RGB JPEG. Other JPEGs are stored as they came. 90 decodes about 1.2x faster in training "
        "than 95, with 30% smaller files.",
    )
    flags.DEFINE_float(
        "max_skipped_fraction",
        0.01,
        "Fail (exit 1, no manifest) when more than this share of the files cannot be decoded: that "
        "usually means a wrong folder. Duplicates do not count. 1 never fails.",
    )


class InputError(ValueError):
    """A problem with the flags or the input folder, found before anything is written."""


class TooManySkippedError(RuntimeError):
    """More files than --max_skipped_fraction allows could not be decoded; no manifest was written."""


@dataclasses.dataclass(frozen=True)
class Source:
    """What to convert (the flags of the same names): an image folder (input_dir, optionally labelled by
    labels_csv, or listed by file_list) or a TFDS dataset (tfds_name, tfds_data_dir, tfds_splits)."""

    input_dir: str | None = None
    labels_csv: str | None = None
    file_list: str | None = None
    tfds_name: str | None = None
    tfds_data_dir: str | None = None
    tfds_splits: str = ""

    def __post_init__(self):
        if self.tfds_name and (self.input_dir or self.labels_csv or self.file_list):
            raise InputError(
                f"--tfds_name={self.tfds_name!r} replaces --input_dir, --labels_csv and --file_list; pass only one source"
            )
        if not self.tfds_name and not self.input_dir:
            raise InputError("--input_dir is missing; pass an image folder (or --tfds_name)")


@dataclasses.dataclass(frozen=True)
class ConversionOptions:
    """How to convert (the flags of the same names; see tfrecords/build.py for their help).

    validation_fraction, test_fraction: shares of the files for validation and test (hash-split layouts).
    num_shards: shards per split; 0 picks the number from target_shard_mb (MiB of source files per shard).
    seed: seed of the split assignment and of the example order.
    overwrite: replace a finished conversion in the output folder instead of refusing.
    num_workers: processes hashing files and writing shards; 0 means all cores.
    max_side: downscale so the longer side is at most this (DEFAULT_MAX_SIDE); 0 keeps the size.
    jpeg_quality: JPEG quality of re-encoded images.
    max_skipped_fraction: fail when a larger share of the files cannot be decoded.
    """

    validation_fraction: float = 0.2
    test_fraction: float = 0.1
    num_shards: int = 0
    target_shard_mb: float = 100
    seed: int = 42
    overwrite: bool = False
    num_workers: int = 0
    max_side: int = DEFAULT_MAX_SIDE
    jpeg_quality: int = images.DEFAULT_JPEG_QUALITY
    max_skipped_fraction: float = 0.01

    def __post_init__(self):
        try:
            _check_settings(self)
        except ValueError as error:
            raise InputError(str(error)) from None


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What prepare() decided before any image is decoded; finish() makes the manifest from it.

    Attributes:
        classes: class names in label order.
        source: the manifest's description of the input (input_dir or tfds_name, layout, seed, ...).
        plan: the plan.Plan: shard tasks, and files skipped before decoding.
        num_sources: files listed (None for TFDS), the base of --max_skipped_fraction.
        write_dir: where the shards are written: output_dir, or with --overwrite of a finished conversion
            its writer.REPLACEMENT_FOLDER, swapped in by finish().
    """

    classes: list
    source: dict
    plan: plan.Plan
    num_sources: int | None
    write_dir: str


def build(source: Source, output_dir: str, options: ConversionOptions) -> dict:
    """Converts an image folder (or a TFDS dataset) into TFRecord shards, labels.txt and manifest.json.

    Args:
        source: what to convert; an input_dir is read in one of the layouts of tfrecords/sources/folder.py.
        output_dir: output folder, local or gs://; created if missing.
        options: how (ConversionOptions).

    Returns:
        The manifest dict, as written to manifest.json.

    Raises:
        InputError: (a ValueError) the flags or the input are unusable; nothing was written.
        TooManySkippedError: too many undecodable files; shards were written, the manifest was not.
    """
    conversion = prepare(source, output_dir, options)
    records = writer.write_shards(
        tasks=conversion.plan.tasks, output_dir=conversion.write_dir, max_side=options.max_side or None,
        jpeg_quality=options.jpeg_quality, classes=conversion.classes,
        num_workers=options.num_workers or progress.default_num_workers(),
    )
    return finish(conversion=conversion, records=records, output_dir=output_dir, options=options)


def prepare(source: Source, output_dir: str, options: ConversionOptions) -> Conversion:
    """Lists, hashes and plans the input, and readies output_dir for the shards.

    The first half of build() (options.num_workers processes hash), shared with tfrecords/beam/pipeline.py,
    so both converters write the same shards from the same plan.

    Raises:
        InputError: (a ValueError) the flags or the input are unusable; nothing was written.
    """
    input_dir, seed, num_workers = source.input_dir, options.seed, options.num_workers or progress.default_num_workers()
    validation_fraction, test_fraction = options.validation_fraction, options.test_fraction
    max_side, jpeg_quality = options.max_side, options.jpeg_quality
    # Only this validation step turns ValueErrors into InputError: a ValueError raised while writing
    # is a bug and must keep its traceback.
    try:
        writer.check_output_dir(output_dir=output_dir, overwrite=options.overwrite, input_dir=input_dir)
        if source.tfds_name:
            # Imported here: tensorflow_datasets takes seconds to import and is only needed for this source.
            from tfrecords.sources import tfds_source

            classes, tasks, description = tfds_source.plan_tfds(
                name=source.tfds_name, data_dir=source.tfds_data_dir, splits=source.tfds_splits,
                num_shards=options.num_shards,
                validation_fraction=validation_fraction, test_fraction=test_fraction, max_side=max_side or None,
                jpeg_quality=jpeg_quality,
            )
            shard_plan = plan.Plan(tasks=tasks, skipped=[], label_conflicts=[])
            num_sources = None
        else:
            listing = folder.list_images(
                input_dir=input_dir, validation_fraction=validation_fraction, test_fraction=test_fraction,
                seed=seed, labels_csv=source.labels_csv, file_list=source.file_list,
            )
            classes = listing.classes
            description = describe_source(source, options, layout=listing.layout)
            shard_plan = None
            num_sources = len(listing.files) + len(listing.skipped)
    except ValueError as error:
        raise InputError(str(error)) from error

    if shard_plan is None:
        shard_plan = plan.make_plan(
            files=listing.files, classes=classes, num_shards=options.num_shards, target_shard_mb=options.target_shard_mb,
            seed=seed, max_side=max_side or None, jpeg_quality=jpeg_quality, num_workers=num_workers,
        )
        shard_plan = dataclasses.replace(
            shard_plan, skipped=listing.skipped + shard_plan.skipped,
            label_conflicts=listing.label_conflicts + shard_plan.label_conflicts,
        )
        try:
            check_classes_kept(
                classes=classes, listed_counts=collections.Counter(source_file.class_name for source_file in listing.files),
                kept_counts=collections.Counter(image.class_name for task in shard_plan.tasks for image in task.images),
                label_conflicts=shard_plan.label_conflicts,
            )
        except ValueError as error:
            raise InputError(str(error)) from error
    # Only now, with the input listed and planned, is anything written.
    writer.claim_output_dir(output_dir)
    write_dir = writer.prepare_output_dir(output_dir=output_dir, planned_files=[task.file for task in shard_plan.tasks])
    return Conversion(classes=classes, source=description, plan=shard_plan, num_sources=num_sources, write_dir=write_dir)


def describe_source(source: Source, options: ConversionOptions, *, layout: str) -> dict:
    """The manifest's description of a listed input folder (both converters write it)."""
    return {
        "input_dir": source.input_dir, "layout": layout, "seed": options.seed,
        "validation_fraction": options.validation_fraction, "test_fraction": options.test_fraction,
        **({"file_list": source.file_list} if source.file_list else {}),
    }


def finish(*, conversion: Conversion, records: list, output_dir: str, options: ConversionOptions) -> dict:
    """Checks the skipped share, writes labels.txt and manifest.json from the shard records; returns the manifest.

    Args:
        conversion: from prepare().
        records: shards.write_shard's record of every task of conversion.plan, in plan order.
        output_dir: the output folder.
        options: as given to prepare() (max_side and jpeg_quality are recorded in the manifest).

    Raises:
        TooManySkippedError: too many undecodable files; the manifest was not written.
    """
    tasks = conversion.plan.tasks
    skipped = conversion.plan.skipped + [entry for record in records for entry in record["skipped"]]
    _check_skipped(
        skipped=skipped, num_sources=conversion.num_sources, records=records,
        max_skipped_fraction=options.max_skipped_fraction,
    )
    splits = writer.summarize_splits(tasks=tasks, records=records, classes=conversion.classes)
    if conversion.num_sources is not None:
        _check_no_class_empty(classes=conversion.classes, splits=splits, skipped=skipped)
    # The new conversion has succeeded: only now may it replace an earlier one (--overwrite).
    writer.replace_finished(output_dir=output_dir, write_dir=conversion.write_dir, tasks=tasks)
    schema.write_labels(output_dir, conversion.classes)
    writer.remove_empty_splits(output_dir=output_dir, tasks=tasks, splits=splits)
    manifest = writer.make_manifest(
        source={**conversion.source, "max_side": options.max_side, "jpeg_quality": options.jpeg_quality},
        classes=conversion.classes,
        splits=splits,
        skipped=skipped,
        label_conflicts=conversion.plan.label_conflicts,
    )
    schema.write_manifest(output_dir, manifest)
    writer.remove_progress(output_dir=output_dir)
    return manifest


def check_classes_kept(*, classes: list, listed_counts: dict, kept_counts: dict, label_conflicts: list) -> None:
    """Refuses a class left empty, or with fewer files than it lost to other classes (links, copies).

    Without it, a link from one class folder into another, or copies of one class's images in another,
    would leave a class with no images while the conversion exits 0.

    Args:
        classes: the class names.
        listed_counts: class name -> files listed in it.
        kept_counts: class name -> files planned into shards (after deduplication).
        label_conflicts: the listing's and the plan's.

    Raises:
        ValueError: naming the class, what it lost and to which class.
    """
    lost = {name: [] for name in classes}
    for conflict in label_conflicts:
        listed_class = conflict["classes"][0]
        for path, class_name in zip(conflict["paths"][1:], conflict["classes"][1:]):
            if class_name != listed_class:
                lost[class_name].append(f"{path} -> {conflict['paths'][0]} ({listed_class})")
    for name in classes:
        kept = kept_counts.get(name, 0)
        if kept == 0 or len(lost[name]) > kept:
            why = (
                f"{len(lost[name])} of its entries are links to or copies of images kept in other classes, e.g. "
                f"{lost[name][:2]}" if lost[name] else f"its folder holds no usable file ({listed_counts.get(name, 0)} listed)"
            )
            raise ValueError(
                f"class {name!r} would have {kept} images: {why}; fix the folder (remove the links or "
                "copies from one class, or the empty class folder) and convert again"
            )


def summarize(*, manifest: dict, output_dir: str) -> str:
    """Returns the one-line summary printed at the end of a run."""
    converted = sum(split["num_examples"] for split in manifest["splits"].values())
    per_split = ", ".join(f"{name} {split['num_examples']}" for name, split in manifest["splits"].items())
    manifest_path = tf.io.gfile.join(output_dir, schema.MANIFEST_FILE)
    return (
        f"converted {converted}, skipped {len(manifest['skipped'])} (see {manifest_path}): "
        f"{per_split or 'no examples'}"
    )


def _check_no_class_empty(*, classes: list, splits: dict, skipped: list) -> None:
    """Raises TooManySkippedError when a class of a folder has no decodable image left in any split."""
    for name in classes:
        if not any(split["class_counts"][name] for split in splits.values()):
            examples = [entry for entry in skipped if entry["path"].split("/")[0] == name or f"/{name}/" in entry["path"]]
            reason = f" (e.g. {examples[0]['path']}: {examples[0]['reason']})" if examples else ""
            raise TooManySkippedError(
                f"class {name!r} has no decodable image left: all its files were skipped{reason}; a model could "
                "never predict it. Fix or remove that class folder and rerun (written shards are kept)"
            )


def _check_skipped(*, skipped: list, num_sources: int | None, records: list, max_skipped_fraction: float) -> None:
    """Raises TooManySkippedError when too many files could not be decoded (duplicates do not count)."""
    unreadable = [entry for entry in skipped if not entry["reason"].startswith(plan.SECOND_PATH_REASONS)]
    if num_sources is None:
        num_sources = len(unreadable) + sum(record["num_examples"] for record in records)
    if not unreadable or len(unreadable) <= max_skipped_fraction * num_sources:
        return
    reasons = {}
    for entry in unreadable:
        reasons.setdefault(entry["reason"].split(":")[0], entry["path"])
    examples = "; ".join(f"{reason} (e.g. {path})" for reason, path in sorted(reasons.items())[:3])
    raise TooManySkippedError(
        f"{len(unreadable)} of {num_sources} files ({len(unreadable) / num_sources:.1%}) could not be "
        f"decoded, more than --max_skipped_fraction={max_skipped_fraction}: {examples}. Check --input_dir; "
        "if these files are expected, rerun with a larger --max_skipped_fraction (written shards are kept)"
    )


def _check_settings(options: ConversionOptions) -> None:
    num_shards, target_shard_mb, num_workers = options.num_shards, options.target_shard_mb, options.num_workers
    max_side, jpeg_quality, max_skipped_fraction = options.max_side, options.jpeg_quality, options.max_skipped_fraction
    if num_shards < 0:
        raise ValueError(f"--num_shards={num_shards} is negative; use 0 (automatic) or a positive count")
    if num_shards == 0 and target_shard_mb <= 0:
        raise ValueError(
            f"--target_shard_mb={target_shard_mb} must be positive when --num_shards=0; e.g. 100"
        )
    if num_workers < 0:
        raise ValueError(f"--num_workers={num_workers} is negative; use 0 (all cores) or a positive count")
    if max_side < 0:
        raise ValueError(f"--max_side={max_side} is negative; use 0 (keep the size) or e.g. 320")
    if not 1 <= jpeg_quality <= 95:
        # Pillow's own advice: above 95 files grow with hardly any gain in quality.
        raise ValueError(f"--jpeg_quality={jpeg_quality} is not in [1, 95]; e.g. 90")
    if not 0 <= max_skipped_fraction <= 1:
        raise ValueError(f"--max_skipped_fraction={max_skipped_fraction} is not in [0, 1]; e.g. 0.01")


def report(*, manifest: dict, flags_text: str, output_dir: str, input_dir: str) -> int:
    """Writes flags.txt, prints the summary line, and returns the exit code of a finished conversion."""
    with tf.io.gfile.GFile(tf.io.gfile.join(output_dir, "flags.txt"), "w") as flags_file:
        flags_file.write(flags_text)
    print(summarize(manifest=manifest, output_dir=output_dir))
    if not manifest["splits"]:
        print(
            f"error: none of the files in --input_dir {input_dir!r} could be read as an image; "
            "the reasons are in the manifest's 'skipped' list",
            file=sys.stderr,
        )
        return 1
    return 0
