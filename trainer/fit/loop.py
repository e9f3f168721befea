"""The epoch loop: one phase of training under any tf.distribute strategy (default, mirrored,
multi-worker, TPU), with what fit()'s callbacks would give (see trainer/fit/steps.py for why not fit()).

train_phase reads top to bottom; each concern is a small piece of its own: the steps (steps.py),
checkpoints and preemption (checkpoints.py), per-epoch reporting (reporting.EpochReporter, given by
the caller), early stopping and the stop on NaN, and profiling (below). It also times how long each step
waits for its input: the number that tells a user whether the accelerator is starved.
"""

import dataclasses
import math
import time

import keras
import tensorflow as tf
from absl import logging

from trainer.fit import checkpoints
from trainer.fit import distribute
from trainer.fit import run_dir
from trainer.fit import steps


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """How the epoch loop runs (the flags of the same names).

    steps_per_epoch: training steps per epoch; 0 = one pass over the train split.
    steps_per_execution: training steps per tf.function call; above 1 the input wait is not timed.
    jit_compile: --jit_compile, the request to XLA-compile the training step (decided by steps.uses_xla).
    checkpoint_every_steps: also checkpoint within an epoch every this many steps; 0 = per epoch only.
    early_stopping_patience: end a phase after this many epochs without a better val_loss; 0 = off.
    fine_tune_patience: end a fine-tuning phase after this many epochs in a row that do not beat the best
        validation accuracy of the run so far (phase 1 included), saying how much time that saved; 0 = off.
    profile_steps: (first, last) training steps of the first phase, counted from 1, to trace for the
        TensorBoard profiler; None = off (parse_profile_steps reads --profile_batches).
    confusion_matrix_images: each epoch's validation confusion matrix goes to TensorBoard as an image.
    """

    steps_per_epoch: int = 0
    steps_per_execution: int = 1
    jit_compile: bool = False
    checkpoint_every_steps: int = 0
    early_stopping_patience: int = 0
    fine_tune_patience: int = 2
    profile_steps: tuple[int, int] | None = None
    confusion_matrix_images: bool = False

    def __post_init__(self):
        for name in ("steps_per_epoch", "checkpoint_every_steps", "early_stopping_patience", "fine_tune_patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} {getattr(self, name)} must be 0 (off or default) or more")
        if self.steps_per_execution < 1:
            raise ValueError(f"--steps_per_execution {self.steps_per_execution} must be at least 1")


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """Parses --profile_batches ("10,20", or "" for off) into (first, last) steps, counted from 1."""
    if not text.strip():
        return None
    parts = text.split(",")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"--profile_batches {text!r} must be 'FIRST,LAST' step numbers, e.g. '10,20'")
    first, last = (int(part) for part in parts)
    if not 1 <= first <= last:
        raise ValueError(f"--profile_batches {text!r} needs 1 <= FIRST <= LAST")
    return first, last


def train_phase(
    phase,
    trained,
    *,
    optimizer,
    loss_function,
    global_batch_size: int,
    strategy: tf.distribute.Strategy,
    model_dir: str,
    reporter,
    preemption: checkpoints.PreemptionWatcher,
    options: LoopOptions,
    weights_model: keras.Model | None = None,
    lock: run_dir.Lock | None = None,
) -> dict:
    """Trains one phase from its latest checkpoint (if any) up to its last epoch.

    Args:
        phase: a transfer.Phase (name, first_epoch, last_epoch: the epoch count runs on across phases).
        trained: a transfer.PhaseData: the model this phase trains (trainable flags set, built in
            strategy.scope()), its training and validation datasets and its evaluation step.
        optimizer: built for trained.model in strategy.scope().
        loss_function: per-example training loss (recipe.make_loss_function); None: cross-entropy.
        reporter: the run's training_log.EpochReporter (its history holds every epoch so far).
        weights_model: the model whose weights are saved as the best ones, when `model` is only a part
            of it (the head trained on cached features); None: trained.model.
        lock: the chief's run_dir.Lock, checked before each write (checkpoints, history.json); None: not checked.

    Returns:
        phase_result's dict: {"phase", "validation_accuracy"}.

    Raises:
        checkpoints.Preempted: after SIGTERM, once the checkpoint is saved.
        FloatingPointError: when the training loss stops being finite.
        run_dir.LockLost: another run took the model_dir over; nothing more was written.
    """
    model = trained.model
    checkpoint = restore_phase(phase, model=trained.checkpoint_model or model, optimizer=optimizer, strategy=strategy, model_dir=model_dir,
                               reporter=reporter)
    if int(checkpoint.epoch) >= phase.last_epoch:
        logging.info("%s already finished in an earlier run (delete --model_dir to retrain)", phase.name)
        return phase_result(phase, reporter.history.epochs)
    train_step = steps.make_train_step(model=model, optimizer=optimizer, strategy=strategy,
                                       global_batch_size=global_batch_size, jit_compile=options.jit_compile,
                                       loss_function=loss_function)
    step_runner = StepRunner(train_step, iter(trained.train_dataset), options.steps_per_execution)
    profiler = Profiler(options.profile_steps, reporter.log_dir, enabled=distribute.is_chief(strategy))
    stopper = EarlyStopping(options.early_stopping_patience, phase.name)
    fine_tune_patience = options.fine_tune_patience if phase.fine_tune_at is not None else 0
    adaptive = AdaptiveStop(fine_tune_patience, phase, best=reporter.history.best_validation_accuracy())
    steps_per_epoch = options.steps_per_epoch
    while int(checkpoint.epoch) < phase.last_epoch:
        totals, input_wait, elapsed = train_epoch(
            step_runner, checkpoint=checkpoint, steps_per_epoch=steps_per_epoch, profiler=profiler,
            preemption=preemption, checkpoint_every_steps=options.checkpoint_every_steps, phase_name=phase.name,
            lock=lock,
        )
        check_finite_loss(phase.name, int(checkpoint.epoch) + 1, totals)
        validation = steps.evaluate(trained.evaluation_step, trained.validation_dataset)
        entry = epoch_entry(phase.name, int(checkpoint.epoch) + 1, totals, validation, optimizer, elapsed, input_wait)
        improved = entry["val_accuracy"] > reporter.history.best_validation_accuracy()
        # Decided before the entry is recorded: a stop is written into it (history.json, metrics.json).
        stop = stopper.should_stop(validation["loss"]) | adaptive.should_stop(entry, epoch=int(checkpoint.epoch) + 1)
        if lock is not None:
            lock.check()
        reporter.record(entry, confusion_matrix=validation["confusion_matrix"], epochs=phase.last_epoch,
                        steps=steps_per_epoch, elapsed=elapsed)
        if improved and distribute.is_chief(strategy):
            checkpoints.save_best_weights(weights_model or model, model_dir, epoch=entry["epoch"])
        checkpoint.step.assign(0)
        checkpoint.epoch.assign_add(1)
        if stop:
            checkpoint.epoch.assign(phase.last_epoch)  # the checkpoint below then marks the phase as finished
        checkpoint.save()
    profiler.stop()  # the phase ended inside the profiled range
    return phase_result(phase, reporter.history.epochs)


def restore_phase(phase, *, model, optimizer, strategy, model_dir: str, reporter) -> checkpoints.PhaseCheckpoint:
    """The phase's checkpoint, restored from its latest save if there is one; the history is cut back to it."""
    checkpoint = checkpoints.PhaseCheckpoint(
        model_dir=model_dir, phase_name=phase.name, model=model, optimizer=optimizer, strategy=strategy,
        initial_epoch=phase.first_epoch,
    )
    if latest := checkpoint.restore_latest():
        logging.info("%s: restored %s (%d epochs and %d steps done)", phase.name, latest,
                     int(checkpoint.epoch), int(checkpoint.step))
    reporter.history.keep_until(int(checkpoint.epoch))
    return checkpoint


def phase_result(phase, history_epochs: list[dict]) -> dict:
    """What train_phase returns: the phase's name, the validation accuracy of its last epoch, and how it stopped
    early (AdaptiveStop), if it did."""
    entries = [entry for entry in history_epochs if entry["phase"] == phase.name]
    return {"phase": phase.name, "validation_accuracy": entries[-1]["val_accuracy"] if entries else None,
            "stopped_early": entries[-1].get("stopped_early") if entries else None}


def train_epoch(step_runner, *, checkpoint, steps_per_epoch, profiler, preemption, checkpoint_every_steps, phase_name,
                lock=None):
    """Runs the training steps left in the current epoch; returns (sums [loss, correct, count], input
    wait in seconds or None when not timed, elapsed seconds). lock: as train_phase's."""
    totals, input_wait, started = tf.zeros([3]), 0.0, time.perf_counter()
    while int(checkpoint.step) < steps_per_epoch:
        num_steps = min(step_runner.steps_per_execution, steps_per_epoch - int(checkpoint.step))
        profiler.before(num_steps)
        sums, wait = step_runner.run(num_steps)
        totals += sums
        input_wait = None if input_wait is None or wait is None else input_wait + wait
        checkpoint.step.assign_add(num_steps)
        profiler.after(num_steps)
        if preemption.requested:
            if lock is not None:
                lock.check()
            checkpoint.save()
            raise checkpoints.Preempted(
                f"{phase_name} stopped by SIGTERM at epoch {int(checkpoint.epoch) + 1}, step {int(checkpoint.step)}"
            )
        step = int(checkpoint.step)
        if checkpoint_every_steps and step % checkpoint_every_steps < num_steps and step < steps_per_epoch:
            if lock is not None:
                lock.check()
            checkpoint.save()
    return totals, input_wait, time.perf_counter() - started


class StepRunner:
    """Runs training steps one per call (timing the wait for each batch) or several per tf.function call."""

    def __init__(self, train_step_functions, iterator, steps_per_execution: int):
        self.train_step, self.train_steps = train_step_functions
        self.iterator = iterator
        self.steps_per_execution = steps_per_execution

    def run(self, num_steps: int):
        """Returns (the steps' sums, seconds spent waiting for input, or None when not measurable)."""
        if num_steps == 1:
            fetch_started = time.perf_counter()
            images, labels = next(self.iterator)
            wait = time.perf_counter() - fetch_started
            return self.train_step(images, labels), wait
        # The batches are taken inside the tf.function: their wait cannot be timed apart.
        return self.train_steps(self.iterator, tf.constant(num_steps)), None


def check_finite_loss(phase_name: str, epoch: int, totals) -> None:
    """Raises FloatingPointError when an epoch's training loss is not finite (before validating it)."""
    loss_sum, _, count = totals.numpy().tolist()
    train_loss = loss_sum / max(count, 1)
    if not math.isfinite(train_loss):
        raise FloatingPointError(
            f"{phase_name}: training loss is {train_loss} at epoch {epoch}; "
            "lower --learning_rate (or --fine_tune_learning_rate), or check the data"
        )


def epoch_entry(phase_name, epoch, totals, validation, optimizer, elapsed, input_wait) -> dict:
    """The history entry of an epoch."""
    loss_sum, correct, count = totals.numpy().tolist()
    train_loss = loss_sum / max(count, 1)
    return {
        "epoch": epoch,
        "phase": phase_name,
        "loss": train_loss,
        "accuracy": correct / max(count, 1),
        "val_loss": validation["loss"],
        "val_accuracy": validation["accuracy"],
        "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
        "images_per_second": count / elapsed if elapsed > 0 else 0.0,
        # Time this process spent blocked in next(iterator) over the epoch's training time; None: not timed.
        "input_wait_fraction": None if input_wait is None else input_wait / max(elapsed, 1e-9),
    }


class EarlyStopping:
    """Stops a phase after `patience` epochs without a lower validation loss (0: never)."""

    def __init__(self, patience: int, phase_name: str):
        self.patience, self.phase_name = patience, phase_name
        self.best_loss, self.epochs_without_improvement, self.stopped = math.inf, 0, False

    def should_stop(self, validation_loss: float) -> bool:
        if not self.patience:
            return False
        if validation_loss < self.best_loss:
            self.best_loss, self.epochs_without_improvement = validation_loss, 0
        else:
            self.epochs_without_improvement += 1
        if self.epochs_without_improvement >= self.patience:
            logging.info("%s: early stop, val_loss has not improved for %d epochs", self.phase_name, self.patience)
            self.stopped = True
        return self.stopped


class AdaptiveStop:
    """Ends a fine-tuning phase once `patience` epochs in a row have not beaten the run's best validation accuracy.

    Phase 2 often costs most of a run and, on a strong backbone, may not beat phase 1: then it stops, and says
    how long the epochs it skipped would have taken (at this phase's mean epoch time, validation included). The
    best weights so far are kept either way (checkpoints.restore_best_weights).
    """

    def __init__(self, patience: int, phase, *, best: float):
        self.patience, self.phase, self.best = patience, phase, best
        self.without_gain, self.seconds, self.started = 0, [], time.perf_counter()

    def should_stop(self, entry: dict, *, epoch: int) -> bool:
        """entry: the epoch's history entry; epoch: epochs done, this one included."""
        self.seconds.append(time.perf_counter() - self.started)
        self.started = time.perf_counter()
        if not self.patience:
            return False
        if entry["val_accuracy"] > self.best:
            self.best, self.without_gain = entry["val_accuracy"], 0
            return False
        self.without_gain += 1
        skipped = self.phase.last_epoch - epoch
        if self.without_gain < self.patience or skipped <= 0:
            return False
        saved = skipped * sum(self.seconds) / len(self.seconds)
        entry["stopped_early"] = {"epochs_skipped": skipped, "seconds_saved": round(saved, 1)}
        logging.warning(
            "%s: stopped after epoch %d of %d: %d epoch(s) without beating validation accuracy %.4f "
            "(--fine_tune_patience=%d); skipping %d epoch(s) saved about %.0f s", self.phase.name, epoch,
            self.phase.last_epoch, self.without_gain, self.best, self.patience, skipped, saved,
        )
        return True


class Profiler:
    """Traces training steps first..last of a phase (counted from 1) for TensorBoard's profiler."""

    def __init__(self, profile_steps: tuple[int, int] | None, log_dir: str, *, enabled: bool):
        self.profile_steps = profile_steps if enabled else None
        self.log_dir = log_dir  # TensorBoard's: the profile shows next to the scalars
        self.steps_done, self.running = 0, False

    def before(self, num_steps: int) -> None:
        if self.profile_steps and not self.running and self.steps_done < self.profile_steps[0] <= self.steps_done + num_steps:
            tf.profiler.experimental.start(self.log_dir)
            self.running = True

    def after(self, num_steps: int) -> None:
        self.steps_done += num_steps
        if self.running and self.steps_done >= self.profile_steps[1]:
            self.stop()

    def stop(self) -> None:
        if self.running:
            tf.profiler.experimental.stop()
            self.running = False
