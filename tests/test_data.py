"""trainer/data.py: the pipeline reads the converter's shards back, batched, decoded and augmented."""

import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer import data


def test_read_manifest_without_one_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"--data_dir '.*' has no manifest.json; create it with"):
        data.read_manifest(str(tmp_path))


def test_missing_split_is_named(demo_data_dir):
    manifest = data.read_manifest(str(demo_data_dir))
    with pytest.raises(ValueError, match=r"has no 'extra' split"):
        data.shard_paths(str(demo_data_dir), manifest, "extra")


def test_evaluation_dataset_reads_every_example_once_in_order(demo_data_dir):
    manifest = data.read_manifest(str(demo_data_dir))
    expected = manifest["splits"]["validation"]["num_examples"]
    dataset = data.make_dataset(
        data_dir=str(demo_data_dir), manifest=manifest, split="validation", image_size=40, batch_size=4,
        training=False,
    )
    assert int(dataset.cardinality()) == -(-expected // 4)
    passes = []
    for _ in range(2):
        batches = list(dataset)
        assert all(images.shape == (4, 40, 40, 3) for images, _, _ in batches)  # the last one padded
        weights = np.concatenate([batch_weights.numpy() for _, _, batch_weights in batches])
        labels = np.concatenate([batch_labels.numpy() for _, batch_labels, _ in batches])
        padded = len(weights)
        assert padded == -(-expected // 4) * 4
        np.testing.assert_allclose(weights[:expected], padded / expected)
        assert (weights[expected:] == 0).all()
        passes.append(labels[:expected])
    np.testing.assert_array_equal(passes[0], passes[1])
    counts = np.bincount(passes[0], minlength=len(manifest["classes"]))
    assert counts.tolist() == [manifest["splits"]["validation"]["class_counts"][name] for name in manifest["classes"]]


def test_training_dataset_repeats_with_full_augmented_batches(demo_data_dir):
    manifest = data.read_manifest(str(demo_data_dir))
    augmentation = data.make_augmentation(flip=True, rotation=0.1, zoom=0.1, seed=0)
    dataset = data.make_dataset(
        data_dir=str(demo_data_dir), manifest=manifest, split="train", image_size=40, batch_size=8,
        training=True, augmentation=augmentation, seed=0,
    )
    num_batches = 3 * manifest["splits"]["train"]["num_examples"] // 8 + 1  # more than one epoch
    for images, labels in dataset.take(num_batches):
        assert images.shape == (8, 40, 40, 3) and images.dtype == tf.float32
        assert labels.dtype == tf.int32
        assert 0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255
        assert set(labels.numpy()) <= set(range(len(manifest["classes"])))


def test_augmentation_layers_follow_the_flags():
    assert data.make_augmentation(flip=False, rotation=0, zoom=0) is None
    names = [type(layer).__name__ for layer in data.make_augmentation(flip=True, rotation=0.2, zoom=0.1).layers]
    assert names == ["RandomFlip", "RandomRotation", "RandomZoom"]
    names = [type(layer).__name__ for layer in data.make_augmentation(flip=False, rotation=0.2, zoom=0).layers]
    assert names == ["RandomRotation"]


def encode(image: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "BMP", "GIF"])
def test_decode_and_resize_eagerly_and_in_tf_data(image_format):
    image = np.zeros((30, 50, 3), np.uint8)
    image[:, :25] = [200, 30, 30]
    encoded = encode(image, image_format)
    eager = data.decode_and_resize(tf.constant(encoded), 20).numpy()
    in_graph = next(iter(tf.data.Dataset.from_tensors(encoded).map(lambda x: data.decode_and_resize(x, 20)))).numpy()
    assert eager.shape == (20, 20, 3) and eager.dtype == np.float32
    np.testing.assert_array_equal(eager, in_graph)
    if image_format != "GIF":  # GIF quantises the colours
        np.testing.assert_allclose(eager[10, 2], [200, 30, 30], atol=8)
        np.testing.assert_allclose(eager[10, 17], [0, 0, 0], atol=8)


def test_manifest_is_what_the_converter_wrote(demo_data_dir):
    with open(demo_data_dir / "manifest.json") as file:
        assert data.read_manifest(str(demo_data_dir)) == json.load(file)


def test_padded_evaluation_gives_exact_loss_and_accuracy(demo_data_dir):
    """Loss and accuracy over padded batches equal those over the real examples alone."""
    import keras

    manifest = data.read_manifest(str(demo_data_dir))
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(8)(x)))
    model.compile(loss="sparse_categorical_crossentropy", weighted_metrics=["accuracy"])
    results = {}
    for batch_size in (1, 7):  # 1: no padding at all
        dataset = data.make_dataset(
            data_dir=str(demo_data_dir), manifest=manifest, split="validation", image_size=16,
            batch_size=batch_size, training=False,
        )
        results[batch_size] = model.evaluate(dataset, return_dict=True, verbose=0)
    assert manifest["splits"]["validation"]["num_examples"] % 7 != 0
    assert results[7]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
    assert results[7]["accuracy"] == pytest.approx(results[1]["accuracy"], rel=1e-6)
