"""tf.data pipelines over the converter's shards, and the manifest that describes them.

One function per dataset, in the canonical order:
list shards -> interleave -> shuffle -> repeat -> map(parse + decode + resize) -> batch -> augment -> prefetch.
Images leave the pipeline as float32 RGB in [0, 255]; scaling for the backbone happens inside the model.
"""

import json

import keras
import tensorflow as tf

from tfrecords import schema

AUTOTUNE = tf.data.AUTOTUNE


def read_manifest(data_dir: str) -> dict:
    """Reads `<data_dir>/manifest.json` written by `python -m tfrecords.build`."""
    path = tf.io.gfile.join(data_dir, schema.MANIFEST_FILE)
    if not tf.io.gfile.exists(path):
        raise ValueError(
            f"--data_dir {data_dir!r} has no {schema.MANIFEST_FILE}; "
            "create it with: python -m tfrecords.build --input_dir=<image folder> --output_dir=<data_dir>"
        )
    with tf.io.gfile.GFile(path, "r") as file:
        return json.load(file)


def shard_paths(data_dir: str, manifest: dict, split: str) -> list[str]:
    """Returns the full paths of a split's shards, checking the split exists."""
    if split not in manifest["splits"]:
        raise ValueError(
            f"--data_dir {data_dir!r} has no {split!r} split (it has {sorted(manifest['splits'])}); "
            "rebuild it with --validation_fraction / --test_fraction above 0, or a pre-split input folder"
        )
    return [tf.io.gfile.join(data_dir, shard["file"]) for shard in manifest["splits"][split]["shards"]]


def decode_and_resize(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP bytes to a float32 [image_size, image_size, 3] image in [0, 255].

    The exported model's serving signature uses this same function, so a served image is
    prepared exactly as the evaluation images were.
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.image.resize(image, [image_size, image_size], antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)


def pad_with_zero_weights(dataset: tf.data.Dataset, num_examples: int, batch_size: int, image_size: int):
    """Adds a sample weight to each (image, label) and zero-weight padding up to a whole batch.

    An evaluation pass must see every example, but a short last batch would leave some replicas an
    empty batch, which Keras 3 cannot run under MirroredStrategy, and a TPU needs static shapes.
    Padding weighs 0. Real examples weigh padded_count / num_examples rather than 1: Keras averages
    the loss over whole batches (padding included), and this constant makes both the loss and the
    weighted accuracy come out exactly as over the real examples alone.
    """
    num_padding = -num_examples % batch_size
    real_weight = (num_examples + num_padding) / num_examples
    dataset = dataset.map(lambda image, label: (image, label, tf.constant(real_weight, tf.float32)))
    padding = tf.data.Dataset.from_tensors(
        (tf.zeros([image_size, image_size, 3]), tf.constant(0, tf.int32), tf.constant(0.0))
    )
    return dataset.concatenate(padding.repeat(num_padding))


def make_augmentation(*, flip: bool, rotation: float, zoom: float, seed: int | None = None):
    """Returns a Keras preprocessing-layer pipeline for training batches, or None when all are off.

    Args:
        flip: random horizontal flips.
        rotation: RandomRotation factor, a fraction of a full turn (0.1 = up to +-36 degrees); 0 = off.
        zoom: RandomZoom factor (0.1 = up to 10% in or out); 0 = off.
        seed: seed for reproducible augmentation.
    """
    augment_layers = []
    if flip:
        augment_layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if rotation > 0:
        augment_layers.append(keras.layers.RandomRotation(rotation, fill_mode="reflect", seed=seed))
    if zoom > 0:
        augment_layers.append(keras.layers.RandomZoom(zoom, fill_mode="reflect", seed=seed))
    if not augment_layers:
        return None
    return keras.Sequential(augment_layers, name="augmentation")


def make_dataset(
    *,
    data_dir: str,
    manifest: dict,
    split: str,
    image_size: int,
    batch_size: int,
    training: bool,
    augmentation=None,
    shuffle_buffer: int = 1000,
    seed: int | None = None,
) -> tf.data.Dataset:
    """Builds the (images, labels) dataset of one split.

    Args:
        data_dir: the converter's output folder (local or gs://).
        manifest: its manifest (read_manifest).
        split: "train", "validation" or "test".
        image_size: output height and width.
        batch_size: global batch size.
        training: shuffle, repeat forever, drop the last partial batch and augment; otherwise one
            pass in a fixed order with the last partial batch kept.
        augmentation: a Keras layer applied to training batches (make_augmentation), or None.
        shuffle_buffer: examples in the shuffle buffer.
        seed: shuffle seed (None: different every run).

    Returns:
        For training, a dataset of (float32 [batch, image_size, image_size, 3] images, int32 [batch]
        labels); otherwise (images, labels, float32 [batch] sample weights), the weights being 0 for
        the padding that fills the last batch (see pad_with_zero_weights).
    """
    files = shard_paths(data_dir, manifest, split)
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if training:
        dataset = dataset.shuffle(len(files), seed=seed)
    # Several shards are read at once so one slow file (or GCS object) does not stall the stream;
    # order only matters for evaluation, where it is kept deterministic.
    dataset = dataset.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 16),
        num_parallel_calls=AUTOTUNE,
        deterministic=not training,
    )
    if training:
        # Shuffle before repeat so each epoch sees every example once.
        dataset = dataset.shuffle(shuffle_buffer, seed=seed).repeat()

    def parse(serialized):
        features = schema.parse_example(serialized)
        image = decode_and_resize(features["image/encoded"], image_size)
        return image, tf.cast(features["image/class/label"], tf.int32)

    dataset = dataset.map(parse, num_parallel_calls=AUTOTUNE)
    if not training:
        dataset = pad_with_zero_weights(dataset, manifest["splits"][split]["num_examples"], batch_size, image_size)
    # Every batch is full (training drops the remainder, evaluation pads it): batches then split
    # evenly across replicas and keep static shapes, which TPUs need.
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if not training:
        # Interleaving hides the length; stating it lets Keras show progress and end the pass
        # without an "input ran out of data" warning.
        num_examples = manifest["splits"][split]["num_examples"]
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(-(-num_examples // batch_size)))
    if training and augmentation is not None:
        # Augment whole batches: one vectorised op per batch is far cheaper than one per image.
        dataset = dataset.map(
            lambda images, labels: (augmentation(images, training=True), labels),
            num_parallel_calls=AUTOTUNE,
        )
    return dataset.prefetch(AUTOTUNE)
