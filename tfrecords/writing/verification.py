"""Re-reads every shard of a conversion and checks it against manifest.json (the work of
`python -m tfrecords.verify`; see that module for what is checked)."""

import tensorflow as tf

from tfrecords import schema
from tfrecords.writing import shards


def verify(*, data_dir: str) -> tuple[list, int, int]:
    """Checks every shard of data_dir against its manifest.

    Args:
        data_dir: a folder with manifest.json and the shards it lists.

    Returns:
        (problems, num_shards, num_examples): problems is a list of one-line descriptions, empty when
        everything matches.

    Raises:
        ValueError: data_dir has no manifest.json.
    """
    if not schema.has_manifest(data_dir):
        raise ValueError(f"--data_dir {data_dir!r} has no {schema.MANIFEST_FILE}; is it a tfrecords.build output?")
    manifest = schema.read_manifest(data_dir)
    classes = manifest["classes"]
    problems = []
    num_shards = 0
    num_examples = 0
    for split_name, split in manifest["splits"].items():
        class_counts = {name: 0 for name in classes}
        for shard in split["shards"]:
            num_shards += 1
            path = tf.io.gfile.join(data_dir, shard["file"])
            if not tf.io.gfile.exists(path):
                problems.append(f"{shard['file']}: missing")
                continue
            if "sha256" in shard and shards.file_sha256(path) != shard["sha256"]:
                problems.append(f"{shard['file']}: sha256 differs from the manifest")
            count = 0
            try:
                for serialized in tf.data.TFRecordDataset(path):
                    count += 1
                    problem = _check_record(serialized, classes=classes, class_counts=class_counts)
                    if problem:
                        problems.append(f"{shard['file']} record {count - 1}: {problem}")
            except tf.errors.OpError as error:
                problems.append(f"{shard['file']}: unreadable after {count} records: {error.message}")
            num_examples += count
            if count != shard["num_examples"]:
                problems.append(f"{shard['file']}: {count} records, manifest says {shard['num_examples']}")
        if class_counts != split["class_counts"]:
            problems.append(f"{split_name}: class counts {class_counts} differ from the manifest's {split['class_counts']}")
    return problems, num_shards, num_examples


def _check_record(serialized: tf.Tensor, *, classes: list, class_counts: dict) -> str | None:
    """Returns what is wrong with one record, or None."""
    try:
        features = schema.parse_example(serialized)
        image = tf.io.decode_jpeg(features["image/encoded"], channels=3)
    except tf.errors.OpError as error:
        return f"does not parse or decode: {error.message}"
    height, width = int(features["image/height"]), int(features["image/width"])
    if tuple(image.shape) != (height, width, 3):
        return f"image is {tuple(image.shape)}, record says {(height, width, 3)}"
    label = int(features["image/class/label"])
    class_name = features["image/class/text"].numpy().decode("utf-8")
    if not 0 <= label < len(classes) or classes[label] != class_name:
        return f"label {label} does not match class {class_name!r}"
    class_counts[class_name] += 1
    return None
