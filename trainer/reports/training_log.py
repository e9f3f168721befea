"""What a run shows while it trains: history.json, TensorBoard scalars and images, one console line per epoch."""

import contextlib
import json
import math
import time

import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from tfrecords import schema
from trainer.reports import metrics

HISTORY_FILE = "history.json"
FLAGS_FILE = "flags.txt"  # the run's resolved flags, written by trainer/train.py
LOG_DIR = "logs"


class Stopwatch:
    """Wall time of a run's stages, in the order they ran, for the table at the end of a run and metrics.json."""

    def __init__(self, started: float | None = None):
        """started: time.perf_counter() when the program started (default: now)."""
        self.started = time.perf_counter() if started is None else started
        self.seconds = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def stage(self, name: str):
        """Times the block as stage `name` (added to an earlier stage of the same name)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def summary(self) -> dict:
        """{stage: seconds}, then "other" (start-up, checks, between stages) and "total", rounded to 0.1 s."""
        total = time.perf_counter() - self.started
        stages = {name: round(seconds, 1) for name, seconds in self.seconds.items()}
        return {**stages, "other": round(max(0.0, total - sum(self.seconds.values())), 1), "total": round(total, 1)}


def format_times(times: dict) -> str:
    """The time table printed at the end of a run, from Stopwatch.summary()."""
    total = max(times["total"], 1e-9)
    width = max(len(name) for name in times) + 2
    lines = ["where the time went (wall seconds, share of the run):"]
    lines += [f"  {name:<{width}}{seconds:8.1f}  {seconds / total:5.0%}" for name, seconds in times.items() if name != "total"]
    lines.append(f"  {'total':<{width}}{times['total']:8.1f}")
    return "\n".join(lines)


class History:
    """Per-epoch metrics of every phase in <model_dir>/history.json, kept consistent with checkpoints."""

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
            schema.write_text(self.path, json.dumps(self.epochs, indent=2))

    def best_validation_accuracy(self) -> float:
        return best_validation_accuracy(self.epochs)


def best_validation_accuracy(epochs: list[dict]) -> float:
    """The best val_accuracy of history entries; -inf when there are none."""
    return max((entry["val_accuracy"] for entry in epochs), default=-math.inf)


class EpochReporter:
    """Records each epoch: the history, TensorBoard (with Keras' scalar names, so both phases make one
    curve per metric), the console, and optionally the validation confusion matrix as an image.

    Args:
        model_dir: the run folder; TensorBoard logs go to <model_dir>/logs/{train,validation}.
        chief: only the chief writes and prints.
        class_names: when given, each epoch's confusion matrix goes to TensorBoard as an image.
    """

    def __init__(self, *, model_dir: str, chief: bool, class_names: list[str] | None = None):
        self.history = History(model_dir, chief)
        self.log_dir = tf.io.gfile.join(model_dir, LOG_DIR)
        self.chief = chief
        self.class_names = class_names
        self.writers = {
            name: tf.summary.create_file_writer(tf.io.gfile.join(self.log_dir, name)) if chief
            else tf.summary.create_noop_writer()
            for name in ("train", "validation")
        }

    def record(self, entry: dict, *, confusion_matrix: list, epochs: int, steps: int, elapsed: float) -> None:
        self.history.append(entry)
        write_summaries(self.writers, entry)
        if not self.chief:
            return
        if self.class_names:
            figure = metrics.plot_confusion_matrix(matrix=confusion_matrix, class_names=self.class_names, path=None)
            write_png_summary(self.writers["validation"], "confusion_matrix", metrics.figure_png(figure), entry["epoch"])
        print(format_epoch(entry, epochs, steps, elapsed), flush=True)


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


def write_hparams(*, model_dir: str, hyperparameters: dict, final_metrics: dict) -> None:
    """Logs the run's hyperparameters and final metrics for TensorBoard's HParams dashboard.

    They go to <model_dir>/logs itself (the run's root; train/ and validation/ are its sub-runs), so
    `tensorboard --logdir <folder of several model_dirs>` lists every run as one row of its table, with
    these metrics as `final/<name>` columns.
    """
    writer = tf.summary.create_file_writer(tf.io.gfile.join(model_dir, LOG_DIR))
    with writer.as_default(step=0):
        hparams_api.hparams(hyperparameters, trial_id=model_dir)
        for name, value in final_metrics.items():
            tf.summary.scalar(f"final/{name}", value)
    writer.flush()
    writer.close()


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
