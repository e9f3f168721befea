"""The distributed training and evaluation steps, and one evaluation pass.

Keras 3 `fit()` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585, ../shared/FINDINGS.md),
so the trainer runs its own loop (trainer/fit/loop.py) under every strategy: these steps are plain Keras 3
(strategy.run + GradientTape + optimizer.apply_gradients), one path tested everywhere.

Workers stay bit-identical under MultiWorkerMirroredStrategy because every variable changes only through
all-reduced gradients: the backbone runs with training=False, so no BatchNormalization statistic is
updated locally (the drift measured in FINDINGS.md was exactly those statistics).
"""

import keras
import tensorflow as tf


def uses_xla(requested: bool, strategy: tf.distribute.Strategy) -> bool:
    """The one place that decides whether the per-replica training step is XLA-compiled (jit_compile), and why.

    Only when asked (--jit_compile, default off): XLA fuses a step's ops, which helps GPUs, while on CPUs it
    compiles for a long time and gains little. Under TPUStrategy every step is compiled by XLA anyway, so the
    request changes nothing there and is not repeated inside it.
    """
    return requested and not isinstance(strategy, tf.distribute.TPUStrategy)


def make_train_step(
    *,
    model: keras.Model,
    optimizer,
    strategy: tf.distribute.Strategy,
    global_batch_size: int,
    jit_compile: bool = False,
    loss_function=None,
):
    """Returns (train_step, train_steps), tf.functions of distributed training.

    train_step(images, labels) runs one step on a batch already taken from a distributed iterator (so
    the caller can time the wait for it); train_steps(iterator, num_steps) runs num_steps steps inside
    one tf.function, sparing the host a round trip per step (what TPUs need). Both return the steps'
    [summed loss, correct predictions, examples] over all replicas. loss_function(labels, probabilities)
    gives per-example losses (recipe.make_loss_function); None: plain cross-entropy.
    """
    loss_function = loss_function or keras.losses.SparseCategoricalCrossentropy(reduction=None)

    # XLA compiles the per-replica step (uses_xla), as Keras does with jit_compile; strategy.run stays outside.
    @tf.function(jit_compile=uses_xla(jit_compile, strategy))
    def replica_step(images, labels):
        with tf.GradientTape() as tape:
            probabilities = model(images, training=True)
            per_example_loss = loss_function(labels, probabilities)
            # Divide by the global batch: gradients are summed across replicas and workers.
            loss = tf.nn.compute_average_loss(per_example_loss, global_batch_size=global_batch_size)
            # Identity unless optimizer is a LossScaleOptimizer (mixed_float16).
            scaled_loss = optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled_loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return batch_sums(per_example_loss, probabilities, labels, tf.ones_like(per_example_loss))

    @tf.function
    def train_step(images, labels):
        sums = strategy.run(replica_step, args=(images, labels))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

    @tf.function
    def train_steps(iterator, num_steps):
        totals = tf.zeros([3])
        for _ in tf.range(num_steps):
            totals += strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_step, args=next(iterator)), axis=None)
        return totals

    return train_step, train_steps


def make_evaluation_step(*, model: keras.Model, strategy: tf.distribute.Strategy):
    """Returns a tf.function of one batch giving ([weighted loss sum, weighted correct, weight sum],
    the batch's [num_classes, num_classes] confusion matrix (rows: true class; padding not counted),
    each replica's probabilities (a per-replica value: evaluate's on_batch reads them))."""
    loss_function = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    num_classes = model.output_shape[-1]

    def replica_step(images, labels, weights):
        probabilities = model(images, training=False)
        predictions = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        # Counts: real examples weigh more than 1 (see data.pad_with_zero_weights), padding 0.
        counted = tf.cast(weights > 0, tf.float32)
        matrix = tf.math.confusion_matrix(labels, predictions, num_classes=num_classes, weights=counted, dtype=tf.float32)
        sums = batch_sums(loss_function(labels, probabilities), probabilities, labels, weights)
        # One flat vector: MultiWorkerMirroredStrategy packs what it all-reduces, and cannot pack mixed ranks.
        return tf.concat([sums, tf.reshape(matrix, [-1])], axis=0), probabilities

    @tf.function
    def evaluation_step(images, labels, weights):
        values, probabilities = strategy.run(replica_step, args=(images, labels, weights))
        values = strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None)
        return values[:3], tf.reshape(values[3:], [num_classes, num_classes]), probabilities

    return evaluation_step


def batch_sums(per_example_loss, probabilities, labels, weights):
    """[sum of weighted losses, sum of weights of correct predictions, sum of weights] of one batch."""
    weights = tf.cast(weights, tf.float32)
    correct = tf.cast(tf.equal(tf.argmax(probabilities, axis=-1, output_type=tf.int32), labels), tf.float32)
    return tf.stack([
        tf.reduce_sum(tf.cast(per_example_loss, tf.float32) * weights),
        tf.reduce_sum(correct * weights),
        tf.reduce_sum(weights),
    ])


def evaluate(evaluation_step, distributed_dataset, *, strategy: tf.distribute.Strategy | None = None,
             on_batch=None) -> dict:
    """One pass over a distributed (images, labels, weights) dataset.

    on_batch: called with (images, labels, weights, probabilities) of each replica's share of each batch, as
    tensors on this host (strategy: the dataset's, needed with it): evaluation.ReportCollector.add, so the
    run's evaluation report comes from this same pass.

    Returns {"loss", "accuracy", "confusion_matrix"} (the matrix a [num_classes, num_classes] int list of
    lists, rows true classes). Padding examples weigh 0, so the ratios are exact over the real examples.
    """
    totals, matrix = tf.zeros([3]), None
    for images, labels, weights in distributed_dataset:
        sums, batch_matrix, probabilities = evaluation_step(images, labels, weights)
        totals += sums
        matrix = batch_matrix if matrix is None else matrix + batch_matrix
        if on_batch is not None:
            for values in zip(*(strategy.experimental_local_results(value)
                                for value in (images, labels, weights, probabilities))):
                on_batch(*values)
    loss_sum, correct, count = totals.numpy().tolist()
    return {
        "loss": loss_sum / max(count, 1e-12),
        "accuracy": correct / max(count, 1e-12),
        "confusion_matrix": [] if matrix is None else matrix.numpy().round().astype(int).tolist(),
    }
