"""One training loop for every tf.distribute strategy: default, mirrored, multi-worker and TPU.

Keras 3 `fit()` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585, ../shared/FINDINGS.md),
so the trainer runs this loop under every strategy rather than fit() under some: one path, tested
everywhere. It is a plain Keras 3 custom loop (strategy.run + GradientTape + optimizer.apply_gradients)
and provides what fit()'s callbacks did: per-epoch validation, TensorBoard scalars, the best weights,
checkpoints that resume mid-epoch, early stopping, a stop on NaN and profiling. It also times how long
each step waits for its input: the number that tells a user whether the accelerator is starved.

Workers stay bit-identical under MultiWorkerMirroredStrategy because every variable changes only through
all-reduced gradients: the backbone runs with training=False, so no BatchNormalization statistic is
updated locally (the drift measured in FINDINGS.md was exactly those statistics).
"""

import json
import math
import signal
import time

import keras
import tensorflow as tf
from absl import logging

from trainer import distribute, report

CHECKPOINT_DIR = "checkpoints"
BEST_WEIGHTS = "best.weights.h5"
HISTORY_FILE = "history.json"
LOG_DIR = "logs"


class Preempted(Exception):
    """Raised after a SIGTERM: the current step finished and a checkpoint was saved."""


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

    # XLA compiles the per-replica step, as Keras does with jit_compile; strategy.run stays outside.
    @tf.function(jit_compile=jit_compile)
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


def make_evaluation_step(*, model: keras.Model, strategy: tf.distribute.Strategy, num_classes: int):
    """Returns a tf.function of one batch giving ([weighted loss sum, weighted correct, weight sum],
    the batch's [num_classes, num_classes] confusion matrix (rows: true class; padding not counted))."""
    loss_function = keras.losses.SparseCategoricalCrossentropy(reduction=None)

    def replica_step(images, labels, weights):
        probabilities = model(images, training=False)
        predictions = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        # Counts: real examples weigh more than 1 (see data.pad_with_zero_weights), padding 0.
        counted = tf.cast(weights > 0, tf.float32)
        matrix = tf.math.confusion_matrix(labels, predictions, num_classes=num_classes, weights=counted, dtype=tf.float32)
        sums = batch_sums(loss_function(labels, probabilities), probabilities, labels, weights)
        # One flat vector: MultiWorkerMirroredStrategy packs what it all-reduces, and cannot pack mixed ranks.
        return tf.concat([sums, tf.reshape(matrix, [-1])], axis=0)

    @tf.function
    def evaluation_step(images, labels, weights):
        values = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_step, args=(images, labels, weights)), axis=None)
        return values[:3], tf.reshape(values[3:], [num_classes, num_classes])

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


def evaluate(evaluation_step, distributed_dataset) -> dict:
    """One pass over a distributed (images, labels, weights) dataset.

    Returns {"loss", "accuracy", "confusion_matrix"} (the matrix a [num_classes, num_classes] int list of
    lists, rows true classes). Padding examples weigh 0, so the ratios are exact over the real examples.
    """
    totals, matrix = tf.zeros([3]), None
    for images, labels, weights in distributed_dataset:
        sums, batch_matrix = evaluation_step(images, labels, weights)
        totals += sums
        matrix = batch_matrix if matrix is None else matrix + batch_matrix
    loss_sum, correct, count = totals.numpy().tolist()
    return {
        "loss": loss_sum / max(count, 1e-12),
        "accuracy": correct / max(count, 1e-12),
        "confusion_matrix": [] if matrix is None else matrix.numpy().round().astype(int).tolist(),
    }


def write_text(path: str, text: str) -> None:
    """Writes a small text file through tf.io.gfile (temporary name, then rename: never half-written)."""
    temporary = path + ".incomplete"
    with tf.io.gfile.GFile(temporary, "w") as file:
        file.write(text)
    tf.io.gfile.rename(temporary, path, overwrite=True)


class History:
    """Per-epoch metrics of both phases in <model_dir>/history.json, kept consistent with checkpoints."""

    def __init__(self, model_dir: str, chief: bool):
        self.path = tf.io.gfile.join(model_dir, HISTORY_FILE)
        self.chief = chief
        self.epochs = []
        if tf.io.gfile.exists(self.path):
            with tf.io.gfile.GFile(self.path, "r") as file:
                self.epochs = json.load(file)

    def keep_until(self, epoch: int) -> None:
        """Forgets epochs after `epoch` (they ran after the checkpoint being resumed from)."""
        self.epochs = [entry for entry in self.epochs if entry["epoch"] <= epoch]

    def append(self, entry: dict) -> None:
        self.epochs.append(entry)
        if self.chief:
            write_text(self.path, json.dumps(self.epochs, indent=2))

    def best_validation_accuracy(self) -> float:
        return max((entry["val_accuracy"] for entry in self.epochs), default=-math.inf)


class PreemptionWatcher:
    """Turns SIGTERM (how cloud schedulers preempt a job) into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: finishing the current step, saving a checkpoint, then exiting")
        self.requested = True

    def close(self):
        signal.signal(signal.SIGTERM, self._previous)


def train_phase(
    *,
    phase: str,
    model: keras.Model,
    optimizer,
    strategy: tf.distribute.Strategy,
    model_dir: str,
    train_dataset,
    validation_dataset,
    global_batch_size: int,
    initial_epoch: int,
    epochs: int,
    steps_per_epoch: int,
    history: History,
    early_stopping_patience: int,
    profile_steps: tuple[int, int] | None,
    checkpoint_every_steps: int,
    preemption: PreemptionWatcher,
    steps_per_execution: int = 1,
    jit_compile: bool = False,
    loss_function=None,
    weights_model: keras.Model | None = None,
    class_names: list[str] | None = None,
) -> None:
    """Trains one phase from its latest checkpoint (if any) up to epoch `epochs`.

    Args:
        phase: "phase1" or "phase2": names the checkpoint folder.
        model, optimizer: compiled for this phase (trainable flags set), built in strategy.scope().
        strategy: the tf.distribute strategy.
        model_dir: run folder (local or gs://).
        train_dataset: distributed, endless (images, labels) dataset.
        validation_dataset: distributed (images, labels, weights) dataset, one pass.
        global_batch_size: examples per step over all replicas.
        initial_epoch: epochs done before this phase (the phase's epochs continue the count).
        epochs: epoch count at which this phase ends.
        steps_per_epoch: training steps per epoch.
        history: the run's History.
        early_stopping_patience: end the phase after this many epochs without a better val_loss; 0 = off.
        profile_steps: (first, last) training steps of this phase, counted from 1, to trace for the
            TensorBoard profiler; None = off.
        checkpoint_every_steps: also checkpoint within an epoch every this many steps; 0 = per epoch only.
        preemption: the SIGTERM watcher.
        steps_per_execution: training steps per tf.function call; above 1 the input wait is not timed.
        jit_compile: XLA-compile the per-replica training step.
        loss_function: per-example training loss (recipe.make_loss_function); None: cross-entropy.
        weights_model: the model whose weights are saved as the best ones, when `model` is only a part
            of it (the head trained on cached features); None: `model`.
        class_names: when given, each epoch's validation confusion matrix goes to TensorBoard as an image.

    Raises:
        Preempted: after SIGTERM, once the checkpoint is saved.
        FloatingPointError: when the training loss stops being finite.
    """
    chief = distribute.is_chief(strategy)
    epoch = tf.Variable(initial_epoch, dtype=tf.int64, trainable=False, name="epoch")
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch, step=step)
    checkpoint_dir = tf.io.gfile.join(model_dir, CHECKPOINT_DIR, phase)
    manager = tf.train.CheckpointManager(
        checkpoint, distribute.write_dir(checkpoint_dir, strategy), max_to_keep=2
    )
    latest = tf.train.latest_checkpoint(checkpoint_dir)
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
        logging.info("%s: restored %s (%d epochs and %d steps done)", phase, latest, int(epoch), int(step))
    history.keep_until(int(epoch))
    if int(epoch) >= epochs:
        logging.info("%s already finished in an earlier run (delete --model_dir to retrain)", phase)
        return

    def save_checkpoint():
        # Every worker saves (the save may need collectives); only the chief writes to checkpoint_dir.
        manager.save()
        distribute.remove_write_dir(manager.directory, strategy)

    train_step, train_steps = make_train_step(
        model=model, optimizer=optimizer, strategy=strategy, global_batch_size=global_batch_size, jit_compile=jit_compile,
        loss_function=loss_function,
    )
    evaluation_step = make_evaluation_step(model=model, strategy=strategy, num_classes=model.output_shape[-1])
    writers = {
        name: tf.summary.create_file_writer(tf.io.gfile.join(model_dir, LOG_DIR, name)) if chief
        else tf.summary.create_noop_writer()
        for name in ("train", "validation")
    }
    iterator = iter(train_dataset)
    best_loss, epochs_without_improvement, phase_step, profiling = math.inf, 0, 0, False
    while int(epoch) < epochs:
        totals, input_wait, started = tf.zeros([3]), 0.0, time.perf_counter()
        while int(step) < steps_per_epoch:
            if profile_steps and chief and not profiling and phase_step < profile_steps[0] <= phase_step + steps_per_execution:
                tf.profiler.experimental.start(tf.io.gfile.join(model_dir, LOG_DIR))
                profiling = True
            num_steps = min(steps_per_execution, steps_per_epoch - int(step))
            if num_steps == 1:
                fetch_started = time.perf_counter()
                images, labels = next(iterator)
                if input_wait is not None:
                    input_wait += time.perf_counter() - fetch_started
                totals += train_step(images, labels)
            else:
                # The batches are taken inside the tf.function: their wait cannot be timed apart.
                input_wait = None
                totals += train_steps(iterator, tf.constant(num_steps))
            step.assign_add(num_steps)
            phase_step += num_steps
            if profiling and phase_step >= profile_steps[1]:
                tf.profiler.experimental.stop()
                profiling = False
            if preemption.requested:
                save_checkpoint()
                raise Preempted(f"{phase} stopped by SIGTERM at epoch {int(epoch) + 1}, step {int(step)}")
            if checkpoint_every_steps and int(step) % checkpoint_every_steps < num_steps and int(step) < steps_per_epoch:
                save_checkpoint()
        elapsed = time.perf_counter() - started
        loss_sum, correct, count = totals.numpy().tolist()
        train_loss = loss_sum / max(count, 1)
        if not math.isfinite(train_loss):
            raise FloatingPointError(
                f"{phase}: training loss is {train_loss} at epoch {int(epoch) + 1}; "
                "lower --learning_rate (or --fine_tune_learning_rate), or check the data"
            )
        validation = evaluate(evaluation_step, validation_dataset)
        entry = {
            "epoch": int(epoch) + 1,
            "phase": phase,
            "loss": train_loss,
            "accuracy": correct / max(count, 1),
            "val_loss": validation["loss"],
            "val_accuracy": validation["accuracy"],
            "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
            "images_per_second": count / elapsed if elapsed > 0 else 0.0,
            # Time this process spent blocked in next(iterator) over the epoch's training time.
            "input_wait_fraction": None if input_wait is None else input_wait / max(elapsed, 1e-9),  # None: not timed
        }
        improved = validation["accuracy"] > history.best_validation_accuracy()
        history.append(entry)
        write_summaries(writers, entry)
        if class_names and chief:
            figure = report.plot_confusion_matrix(matrix=validation["confusion_matrix"], class_names=class_names, path=None)
            write_png_summary(writers["validation"], "confusion_matrix", report.figure_png(figure), entry["epoch"])
        if chief:
            print(format_epoch(entry, epochs, steps_per_epoch, elapsed), flush=True)
        if improved and chief:
            tf.io.gfile.makedirs(tf.io.gfile.join(model_dir, CHECKPOINT_DIR))
            (weights_model or model).save_weights(tf.io.gfile.join(model_dir, CHECKPOINT_DIR, BEST_WEIGHTS))
        step.assign(0)
        epoch.assign_add(1)
        if early_stopping_patience:
            if validation["loss"] < best_loss:
                best_loss, epochs_without_improvement = validation["loss"], 0
            else:
                epochs_without_improvement += 1
            if epochs_without_improvement >= early_stopping_patience:
                logging.info("%s: early stop, val_loss has not improved for %d epochs", phase, early_stopping_patience)
                epoch.assign(epochs)  # the checkpoint below then marks the phase as finished
        save_checkpoint()
    if profiling:  # the phase ended inside the profiled range
        tf.profiler.experimental.stop()


def write_summaries(writers: dict, entry: dict) -> None:
    """Writes an epoch's scalars with Keras' names, so TensorBoard shows both phases as one run."""
    with writers["train"].as_default(step=entry["epoch"]):
        for name in ("loss", "accuracy", "learning_rate", "images_per_second", "input_wait_fraction"):
            if entry[name] is not None:
                tf.summary.scalar(f"epoch_{name}", entry[name])
    with writers["validation"].as_default(step=entry["epoch"]):
        tf.summary.scalar("epoch_loss", entry["val_loss"])
        tf.summary.scalar("epoch_accuracy", entry["val_accuracy"])
    for writer in writers.values():
        writer.flush()


def write_png_summary(writer, name: str, png: bytes, step: int) -> None:
    """Writes a PNG (a matplotlib figure's) as a TensorBoard image."""
    with writer.as_default(step=step):
        tf.summary.image(name, tf.io.decode_png(png, channels=3)[tf.newaxis])
    writer.flush()


def write_image_summary(*, model_dir: str, name: str, images, step: int = 0, max_images: int = 8) -> None:
    """Writes a few float [0, 255] images (e.g. augmented training images) to TensorBoard's train run."""
    writer = tf.summary.create_file_writer(tf.io.gfile.join(model_dir, LOG_DIR, "train"))
    with writer.as_default(step=step):
        tf.summary.image(name, tf.cast(images[:max_images], tf.float32) / 255.0, max_outputs=max_images)
    writer.flush()


def format_epoch(entry: dict, epochs: int, steps: int, elapsed: float) -> str:
    """One console line per epoch, like Keras' verbose=2."""
    return (
        f"Epoch {entry['epoch']}/{epochs} ({entry['phase']}) - {steps} steps - {elapsed:.1f}s - "
        f"{entry['images_per_second']:.0f} img/s - input wait {format_fraction(entry['input_wait_fraction'])} - "
        f"loss: {entry['loss']:.4f} - accuracy: {entry['accuracy']:.4f} - "
        f"val_loss: {entry['val_loss']:.4f} - val_accuracy: {entry['val_accuracy']:.4f}"
    )


def format_fraction(fraction: float | None) -> str:
    return "n/a (steps_per_execution > 1)" if fraction is None else f"{100 * fraction:.0f}%"
