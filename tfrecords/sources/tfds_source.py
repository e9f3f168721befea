"""Reads a TensorFlow Datasets dataset as the source of a conversion (`--tfds_name`).

    python -m tfrecords.build --tfds_name=tf_flowers --output_dir=/tmp/flowers_tfrecords --max_side=320

The dataset is prepared with TFDS's own builder (downloaded into --tfds_data_dir if missing), then each
of our shards reads one `tfds.even_splits` part of its TFDS split, in TFDS's stored order, with the
image left encoded (`SkipDecoding`) and passed through the same `images.load_image` as files. TFDS
examples are not deduplicated. The image feature is the dataset's first `Image` feature and the label
its first `ClassLabel`; class names come from that ClassLabel.
"""

import dataclasses
import math

import tensorflow_datasets as tfds

from tfrecords import schema
from tfrecords.writing import plan
from tfrecords.writing import shards

EXAMPLES_PER_AUTOMATIC_SHARD = 1024


def parse_splits(splits: str) -> dict:
    """Parses --tfds_splits "train=train[:80%],validation=train[80%:]" into {our split: TFDS split}."""
    mapping = {}
    for pair in filter(None, (part.strip() for part in splits.split(","))):
        ours, _, theirs = pair.partition("=")
        if ours not in schema.SPLITS or not theirs:
            raise ValueError(
                f"--tfds_splits {splits!r} has {pair!r}; expected <split>=<TFDS split> with <split> one of "
                f"{', '.join(schema.SPLITS)}"
            )
        mapping[ours] = theirs
    return mapping


def plan_tfds(
    *, name: str, data_dir: str | None, splits: str, num_shards: int, validation_fraction: float,
    test_fraction: float, max_side: int | None, jpeg_quality: int,
) -> tuple[list, list, dict]:
    """Prepares the dataset and returns (classes, shard tasks, manifest source fields)."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # TFDS raises several types (DatasetNotFoundError, ValueError, ...).
        raise ValueError(f"--tfds_name {name!r} cannot be loaded: {error}") from None
    features = builder.info.features
    image_key = next((key for key, feature in features.items() if isinstance(feature, tfds.features.Image)), None)
    label_key = next((key for key, feature in features.items() if isinstance(feature, tfds.features.ClassLabel)), None)
    if image_key is None or label_key is None:
        raise ValueError(f"--tfds_name {name!r} has no Image and ClassLabel features ({list(features)})")
    classes = list(features[label_key].names)
    mapping = parse_splits(splits) or _default_splits(
        available=list(builder.info.splits), validation_fraction=validation_fraction, test_fraction=test_fraction
    )
    builder.download_and_prepare()
    tasks = []
    for split in schema.SPLITS:
        if split not in mapping:
            continue
        shard_count = num_shards
        if shard_count <= 0:
            known = builder.info.splits[mapping[split]].num_examples if builder.info.splits else 0
            shard_count = max(1, math.ceil(known / EXAMPLES_PER_AUTOMATIC_SHARD))
        for index in range(shard_count):
            file = schema.shard_name(split, index, shard_count)
            read = {
                "name": name, "data_dir": data_dir, "split": mapping[split], "index": index, "count": shard_count,
                "image_key": image_key, "label_key": label_key, "classes": classes,
            }
            identity = {
                "version": plan.SHARD_FORMAT_VERSION, "file": file, "max_side": max_side,
                "jpeg_quality": jpeg_quality, "tfds_version": str(builder.info.version), **read,
            }
            tasks.append(shards.ShardTask(split=split, file=file, source=TfdsSource(**read), fingerprint=plan.fingerprint(identity)))
    source = {"tfds_name": name, "tfds_version": str(builder.info.version), "layout": "tfds", "tfds_splits": mapping}
    return classes, tasks, source


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """Part `index` of `count` of a TFDS split (a ShardTask's source), in TFDS's stored order."""

    name: str
    data_dir: str | None
    split: str
    index: int
    count: int
    image_key: str
    label_key: str
    classes: list
    images = ()  # the examples are known only by reading them

    def read(self):
        """Yields (SourceImage, encoded image bytes) for every example of the part."""
        part = tfds.even_splits(self.split, n=self.count)[self.index]
        dataset = tfds.load(
            self.name, split=part, data_dir=self.data_dir, shuffle_files=False, download=False,
            decoders={self.image_key: tfds.decode.SkipDecoding()},
        )
        for position, example in enumerate(tfds.as_numpy(dataset)):
            label = int(example[self.label_key])
            source = shards.SourceImage(
                path="", relative_path=f"{self.split}/part{self.index}of{self.count}/{position}",
                class_name=self.classes[label], label=label,
            )
            yield source, bytes(example[self.image_key])


def _default_splits(*, available: list, validation_fraction: float, test_fraction: float) -> dict:
    if "validation" in available or "test" in available or len(available) > 1:
        return {split: split for split in schema.SPLITS if split in available}
    # Only "train" (e.g. tf_flowers): cut it by the fractions, in whole percent as TFDS slices take.
    test = round(test_fraction * 100)
    validation = test + round(validation_fraction * 100)
    mapping = {"train": f"train[{validation}%:]"}
    if validation > test:
        mapping["validation"] = f"train[{test}%:{validation}%]"
    if test > 0:
        mapping["test"] = f"train[:{test}%]"
    return mapping
