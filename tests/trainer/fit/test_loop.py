"""trainer/fit/loop.py: the epoch loop (resume, profiling, in-graph steps, XLA, early stopping, NaN stop)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.trainer.fit.test_steps import adam, separable_batches, tiny_model
from trainer.fit import checkpoints
from trainer.fit import loop
from trainer.fit import steps
from trainer.fit import transfer
from trainer.reports import training_log


def phase_data(model, train_dataset, validation) -> transfer.PhaseData:
    evaluation_step = steps.make_evaluation_step(model=model, strategy=tf.distribute.get_strategy())
    return transfer.PhaseData(model=model, train_dataset=train_dataset, validation_dataset=validation,
                              evaluation_step=evaluation_step)


@pytest.fixture
def preemption():
    """A SIGTERM watcher that gives the previous handler back: a handler left behind would be inherited
    by the processes later tests fork, which then could not be terminated."""
    with checkpoints.PreemptionWatcher() as watcher:
        yield watcher


def test_train_phase_resumes_from_its_checkpoint(tmp_path, preemption):
    strategy = tf.distribute.get_strategy()
    images, labels = separable_batches(6)
    train_dataset = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
    validation = tf.data.Dataset.from_tensor_slices((images[:2], labels[:2], np.ones((2, 8), "float32")))
    reporter = training_log.EpochReporter(model_dir=str(tmp_path / "run"), chief=True)
    history = reporter.history

    def run(epochs):
        model = tiny_model(tmp_path)
        loop.train_phase(
            transfer.Phase("phase1", 0, epochs, 1e-2, "adam", None), phase_data(model, train_dataset, validation),
            optimizer=adam(model), loss_function=None, global_batch_size=8, strategy=strategy,
            model_dir=str(tmp_path / "run"), reporter=reporter, preemption=preemption,
            options=loop.LoopOptions(steps_per_epoch=3, profile_steps=(2, 3)),
        )
        return model

    first = run(2)
    second = run(4)  # a new model restored from the epoch-2 checkpoint, then 2 more epochs
    assert [entry["epoch"] for entry in history.epochs] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run" / training_log.HISTORY_FILE).read_text())[-1]["epoch"] == 4
    assert not all(np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights()))
    assert list((tmp_path / "run" / checkpoints.CHECKPOINT_DIR).glob("best_epoch_*.weights.h5"))
    # --profile_batches wrote a trace for TensorBoard's profiler.
    assert list((tmp_path / "run" / training_log.LOG_DIR / "plugins" / "profile").rglob("*.xplane.pb"))
    third = run(4)  # nothing left to do: restores and returns
    assert all(np.array_equal(a, b) for a, b in zip(second.get_weights(), third.get_weights()))


def test_parse_profile_steps():
    assert loop.parse_profile_steps("") is None
    assert loop.parse_profile_steps("10,20") == (10, 20)
    for bad in ("10", "a,b", "0,3", "5,2"):
        with pytest.raises(ValueError, match="--profile_batches"):
            loop.parse_profile_steps(bad)


@pytest.mark.parametrize("steps_per_execution, jit_compile", [(3, False), (1, True)])
def test_in_graph_steps_and_xla_compilation(tmp_path, steps_per_execution, jit_compile, preemption):
    images, labels = separable_batches(12)
    train_dataset = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
    validation = tf.data.Dataset.from_tensor_slices((images[:2], labels[:2], np.ones((2, 8), "float32")))
    reporter = training_log.EpochReporter(model_dir=str(tmp_path / "run"), chief=True)
    history = reporter.history
    model = tiny_model(tmp_path)
    loop.train_phase(
        transfer.Phase("phase1", 0, 3, 1e-2, "adam", None), phase_data(model, train_dataset, validation),
        optimizer=adam(model), loss_function=None, global_batch_size=8, strategy=tf.distribute.get_strategy(),
        model_dir=str(tmp_path / "run"), reporter=reporter, preemption=preemption,
        options=loop.LoopOptions(steps_per_epoch=4, checkpoint_every_steps=2, steps_per_execution=steps_per_execution,
                                 jit_compile=jit_compile),
    )
    assert [entry["epoch"] for entry in history.epochs] == [1, 2, 3]
    waits = [entry["input_wait_fraction"] for entry in history.epochs]
    assert all(wait is None for wait in waits) if steps_per_execution > 1 else all(0 <= wait <= 1 for wait in waits)
    assert history.epochs[-1]["loss"] < history.epochs[0]["loss"]


def test_early_stopping_waits_for_patience_epochs_without_a_lower_loss():
    stopper = loop.EarlyStopping(2, "phase1")
    assert [stopper.should_stop(loss) for loss in (1.0, 0.9, 0.95, 0.91)] == [False, False, False, True]
    assert stopper.stopped
    assert not any(loop.EarlyStopping(0, "phase1").should_stop(loss) for loss in (1.0, 2.0, 3.0))


def test_a_loss_that_is_not_finite_stops_with_what_to_do():
    validation = {"loss": 1.0, "accuracy": 0.5}
    with pytest.raises(FloatingPointError, match="phase2: training loss is nan at epoch 4; lower --learning_rate"):
        loop.check_finite_loss("phase2", 4, tf.constant([float("nan"), 1.0, 8.0]))
    entry = loop.epoch_entry("phase2", 4, tf.constant([4.0, 6.0, 8.0]), validation, keras.optimizers.SGD(), 2.0, 0.1)
    assert (entry["loss"], entry["accuracy"], entry["images_per_second"]) == (0.5, 0.75, 4.0)


def test_loop_options_check_their_flags():
    with pytest.raises(ValueError, match="--steps_per_execution 0 must be at least 1"):
        loop.LoopOptions(steps_per_execution=0)
    with pytest.raises(ValueError, match="--checkpoint_every_steps -1 must be 0"):
        loop.LoopOptions(checkpoint_every_steps=-1)


def test_a_fine_tuning_phase_that_cannot_beat_phase_1_stops_after_its_patience_and_says_what_it_saved(
    tmp_path, preemption, caplog
):
    strategy = tf.distribute.get_strategy()
    images, labels = separable_batches(6)
    train_dataset = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
    validation = tf.data.Dataset.from_tensor_slices((images[:2], labels[:2], np.ones((2, 8), "float32")))
    reporter = training_log.EpochReporter(model_dir=str(tmp_path / "run"), chief=True)
    # Phase 1 reached a validation accuracy nothing can beat; phase 2 (a learning rate of 0) cannot move.
    reporter.history.append({"epoch": 1, "phase": "phase1", "val_accuracy": 1.01})
    model = tiny_model(tmp_path)
    frozen = keras.optimizers.SGD(learning_rate=0.0)
    result = loop.train_phase(
        transfer.Phase("phase2", 1, 6, 0.0, "sgd", "0.5"), phase_data(model, train_dataset, validation),
        optimizer=frozen, loss_function=None, global_batch_size=8, strategy=strategy,
        model_dir=str(tmp_path / "run"), reporter=reporter, preemption=preemption,
        options=loop.LoopOptions(steps_per_epoch=2, fine_tune_patience=2),
    )
    phase2 = [entry for entry in reporter.history.epochs if entry["phase"] == "phase2"]
    assert [entry["epoch"] for entry in phase2] == [2, 3]  # two epochs without a gain, then three skipped
    assert result["stopped_early"]["epochs_skipped"] == 3 and result["stopped_early"]["seconds_saved"] > 0
    assert json.loads((tmp_path / "run" / training_log.HISTORY_FILE).read_text())[-1]["stopped_early"]["epochs_skipped"] == 3
    assert "phase2: stopped after epoch 3 of 6: 2 epoch(s) without beating validation accuracy 1.0100" in caplog.text


def test_a_fine_tune_patience_of_0_never_stops():
    stop = loop.AdaptiveStop(0, transfer.Phase("phase2", 1, 4, 0.0, "sgd", "0.5"), best=0.9)
    assert not any(stop.should_stop({"val_accuracy": 0.1}, epoch=epoch) for epoch in (2, 3))


@pytest.mark.parametrize("checkpoint_every_steps", [0, 1])
def test_a_run_that_lost_its_lock_writes_no_checkpoint_or_history(tmp_path, preemption, checkpoint_every_steps):
    # Paused for long, it resumed before its heartbeat noticed that a run on another host took model_dir over.
    from trainer.fit import run_dir

    images, labels = separable_batches(6)
    train_dataset = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
    validation = tf.data.Dataset.from_tensor_slices((images[:2], labels[:2], np.ones((2, 8), "float32")))
    reporter = training_log.EpochReporter(model_dir=str(tmp_path / "run"), chief=True)
    lock = run_dir.acquire_lock(str(tmp_path / "run"), on_lost=lambda message: None)
    (tmp_path / "run" / run_dir.LOCK_FILE).write_text(json.dumps({"host": "other-vm", "pid": 4321, "token": "theirs"}))
    model = tiny_model(tmp_path)
    with pytest.raises(run_dir.LockLost, match=r"taken over by another run \(host 'other-vm', pid 4321\)"):
        loop.train_phase(
            transfer.Phase("phase1", 0, 2, 1e-2, "adam", None), phase_data(model, train_dataset, validation),
            optimizer=adam(model), loss_function=None, global_batch_size=8, strategy=tf.distribute.get_strategy(),
            model_dir=str(tmp_path / "run"), reporter=reporter, preemption=preemption, lock=lock,
            options=loop.LoopOptions(steps_per_epoch=3, checkpoint_every_steps=checkpoint_every_steps),
        )
    lock.release()
    assert not (tmp_path / "run" / checkpoints.CHECKPOINT_DIR).exists()
    assert not (tmp_path / "run" / training_log.HISTORY_FILE).exists()
    assert json.loads((tmp_path / "run" / run_dir.LOCK_FILE).read_text())["token"] == "theirs"
