"""Checkpoints that resume mid-epoch, the SIGTERM watcher of preemptible jobs, and the best weights.

    <model_dir>/checkpoints/<phase>/ckpt-N   model, optimizer, epoch and step within the epoch (two kept)
    <model_dir>/checkpoints/best_epoch_N.weights.h5  the weights of the best validation accuracy so far (epoch N)

Each phase has its own checkpoint folder; a rerun skips every phase before the last one that has a
checkpoint (a later checkpoint holds the whole model). At the end the weights with the best validation
accuracy are restored, with a warning naming the likely cause when the last epoch was not the best.
"""

import signal

import keras
import tensorflow as tf
from absl import logging

from trainer.fit import distribute

CHECKPOINT_DIR = "checkpoints"
BEST_PREFIX = "best_epoch_"
BEST_WEIGHTS = BEST_PREFIX + "{epoch}.weights.h5"
PARTIAL_PREFIX = "partial_"  # a best-weights file being written (Keras needs the .weights.h5 ending)


class Preempted(Exception):
    """Raised after a SIGTERM: the current step finished and a checkpoint was saved."""


class PreemptionWatcher:
    """Turns SIGTERM (how cloud schedulers preempt a job) into a flag the loop checks after each step.

    Use it as a context manager: the previous handler comes back on exit.
    """

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: finishing the current step, saving a checkpoint, then exiting")
        self.requested = True

    def close(self):
        signal.signal(signal.SIGTERM, self._previous)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.close()


def phase_dir(model_dir: str, phase_name: str) -> str:
    return tf.io.gfile.join(model_dir, CHECKPOINT_DIR, phase_name)


def has_checkpoint(model_dir: str, phase_name: str) -> bool:
    return tf.train.latest_checkpoint(phase_dir(model_dir, phase_name)) is not None


def epochs_done(model_dir: str, phase_name: str) -> int:
    """The epoch count saved in the phase's latest checkpoint (epochs of the run, earlier phases included); 0: none."""
    latest = tf.train.latest_checkpoint(phase_dir(model_dir, phase_name))
    return int(tf.train.load_variable(latest, "epoch/.ATTRIBUTES/VARIABLE_VALUE")) if latest else 0


class PhaseCheckpoint:
    """One phase's checkpoints: model, optimizer, the epoch count and the step within the epoch.

    Every worker saves (the save may need collectives); only the chief writes to the phase's folder.
    """

    def __init__(self, *, model_dir: str, phase_name: str, model, optimizer, strategy, initial_epoch: int):
        self.epoch = tf.Variable(initial_epoch, dtype=tf.int64, trainable=False, name="epoch")
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
        self.strategy = strategy
        self.directory = phase_dir(model_dir, phase_name)
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=self.epoch, step=self.step)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, distribute.write_dir(self.directory, strategy), max_to_keep=2
        )

    def restore_latest(self) -> str | None:
        """Restores the latest checkpoint of the phase, if any; returns its path."""
        latest = tf.train.latest_checkpoint(self.directory)
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        return latest

    def save(self) -> None:
        self.manager.save()
        distribute.remove_write_dir(self.manager.directory, self.strategy)


def best_weights_path(model_dir: str, epoch: int) -> str:
    return tf.io.gfile.join(model_dir, CHECKPOINT_DIR, BEST_WEIGHTS.format(epoch=epoch))


def save_best_weights(model: keras.Model, model_dir: str, *, epoch: int) -> None:
    """Saves the weights of `epoch` (of the run's history) as the best so far, then removes earlier ones.

    Written under a temporary name and renamed: a run killed meanwhile leaves no half-written file under a best
    name. Named after its epoch: a rerun restores only the best epoch its history holds, never weights of an epoch
    the killed run saved but did not checkpoint (restore_best_weights).
    """
    folder = tf.io.gfile.join(model_dir, CHECKPOINT_DIR)
    tf.io.gfile.makedirs(folder)
    path = best_weights_path(model_dir, epoch)
    partial = tf.io.gfile.join(folder, PARTIAL_PREFIX + BEST_WEIGHTS.format(epoch=epoch))
    model.save_weights(partial)
    tf.io.gfile.rename(partial, path, overwrite=True)
    for name in tf.io.gfile.listdir(folder):
        earlier = name.startswith((PARTIAL_PREFIX, BEST_PREFIX))
        if earlier and tf.io.gfile.join(folder, name) != path:
            tf.io.gfile.remove(tf.io.gfile.join(folder, name))


def restore_best_weights(*, model: keras.Model, model_dir: str, epochs: list[dict]) -> dict | None:
    """Restores the weights of the best validation accuracy when the last epoch was worse.

    Args:
        epochs: the run's history entries (reporting.History.epochs).

    Returns the best history entry when weights were restored, else None. Logs a warning naming the
    likely cause: phase 2 is where transfer learning classically goes wrong.
    """
    if not epochs:
        return None
    best = max(epochs, key=lambda entry: entry["val_accuracy"])
    last = epochs[-1]
    if last["val_accuracy"] >= best["val_accuracy"]:
        return None
    path = best_weights_path(model_dir, best["epoch"])
    if not tf.io.gfile.exists(path):
        logging.warning(
            "validation accuracy ended at %.4f (epoch %d), below its best %.4f (epoch %d), but the weights of epoch %d "
            "are not on disk (a run stopped while saving them, or one of an earlier version): the last epoch's weights "
            "are kept", last["val_accuracy"], last["epoch"], best["val_accuracy"], best["epoch"], best["epoch"],
        )
        return None
    if best["phase"] == "phase1" and last["phase"] != "phase1":
        cause = (
            "fine-tuning made it worse than the frozen backbone: --fine_tune_learning_rate is likely too high, "
            "or --fine_tune_at unfreezes too many layers for this much data"
        )
    else:
        cause = "the later epochs overfit or the rate was too high: try fewer epochs or --early_stopping_patience"
    logging.warning(
        "validation accuracy ended at %.4f (epoch %d, %s), below its best %.4f (epoch %d, %s): %s. "
        "Restored the best weights.",
        last["val_accuracy"], last["epoch"], last["phase"], best["val_accuracy"], best["epoch"], best["phase"], cause,
    )
    model.load_weights(path)
    return best
