"""Phase 1 on cached features: run the frozen backbone once per image, then train the head on its output.

While the backbone is frozen (and in inference mode) its pooled output for an image never changes, so
phase 1 spends nearly all its time recomputing the same numbers. Here the model is split at the head,

    full model = feature model (input -> [augmentation] -> preprocess -> backbone(s) -> pooling)
                 + head (dropout -> classifier),

the feature model runs over the training set once (or once per augmented view) and over the validation
set once, and the head trains on those features: many epochs in seconds. The head's layers are the full
model's own layers, so training the head trains the full model. Without augmentation the result is the
model the slow path would give (tests/test_features.py checks it); with augmentation each image has
`views` random crops and flips instead of a new one every epoch.
"""

import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

FEATURES_INPUT = "features"
# The layers that make the head; everything before them is the feature model.
HEAD_LAYERS = ("dropout", "classifier")


def split_model(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Returns (feature_model, head) sharing the full model's layers (and so its weights)."""
    dropout, classifier = (model.get_layer(name) for name in HEAD_LAYERS)
    feature_model = keras.Model(model.inputs, dropout.input, name="feature_model")
    features = keras.Input(shape=feature_model.output.shape[1:], name=FEATURES_INPUT)
    head = keras.Model(features, classifier(dropout(features)), name="head")
    return feature_model, head


def compute_features(
    *, feature_model: keras.Model, strategy: tf.distribute.Strategy, dataset, num_batches: int | None, training: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs the feature model over a distributed dataset; returns this worker's (features, labels, weights).

    Args:
        feature_model: from split_model.
        strategy: the tf.distribute strategy (the dataset is distributed by it).
        dataset: distributed (images, labels) or (images, labels, weights) batches; weights are kept
            (evaluation padding weighs 0), or are 1 when the dataset has none.
        num_batches: batches to take (for an endless training dataset); None: the whole dataset.
        training: run the model's augmentation layers (augment_on=device); the backbone stays in inference mode.
    """

    def replica_step(images, labels, weights=None):
        features = tf.cast(feature_model(images, training=training), tf.float32)
        return features, labels, tf.ones_like(labels, tf.float32) if weights is None else weights

    @tf.function
    def step(batch):
        return strategy.run(replica_step, args=batch)

    parts = ([], [], [])
    for index, batch in enumerate(dataset):
        if num_batches is not None and index >= num_batches:
            break
        for part, values in zip(parts, step(batch)):
            part.extend(keras.ops.convert_to_numpy(value) for value in strategy.experimental_local_results(values))
    features, labels, weights = (np.concatenate(part) for part in parts)
    return features, labels.astype(np.int32), weights.astype(np.float32)


def training_features(
    *, feature_model: keras.Model, strategy, dataset, num_examples: int, batch_size: int, views: int, training: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Features of `views` passes over the (shuffled, endless) training dataset, about one view per image each.

    Args:
        num_examples: examples in the train split.
        batch_size: the global batch size of `dataset`.
        views: passes; each applies new random crops and flips (1 when augmentation is off).
    """
    num_batches = max(1, views * num_examples // batch_size)
    started = time.perf_counter()
    features, labels, _ = compute_features(
        feature_model=feature_model, strategy=strategy, dataset=dataset, num_batches=num_batches, training=training
    )
    logging.info(
        "phase1: cached %d training features of width %d (%d view(s) per image) in %.1fs, %.0f MiB",
        len(features), features.shape[-1], views, time.perf_counter() - started, features.nbytes / 2**20,
    )
    return features, labels


def make_feature_dataset(
    *, arrays: tuple, batch_size: int, training: bool, seed: int | None, input_context=None
) -> tf.data.Dataset:
    """Batches of cached features for one input pipeline (the features this worker computed).

    Args:
        arrays: (features, labels) for training; (features, labels, weights) for evaluation, as
            compute_features returned them (whole per-replica batches, padding weighing 0).
        batch_size: the global batch size.
        training: shuffled, endless, whole per-replica batches; otherwise one pass in order.
        seed: shuffle seed.
        input_context: from distribute_datasets_from_function.
    """
    local_batch_size = input_context.get_per_replica_batch_size(batch_size) if input_context else batch_size
    dataset = tf.data.Dataset.from_tensor_slices(arrays)
    if training:
        dataset = dataset.shuffle(len(arrays[0]), seed=seed).repeat()
    return dataset.batch(local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
