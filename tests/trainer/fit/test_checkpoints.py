"""trainer/fit/checkpoints.py: the best-weights guard, phase checkpoints and the SIGTERM watcher."""

import os
import signal

import keras
import numpy as np
import tensorflow as tf

from trainer.fit import checkpoints


def test_best_weights_are_restored_with_a_warning_naming_the_cause(tmp_path, caplog):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_initializer="ones")])
    (tmp_path / checkpoints.CHECKPOINT_DIR).mkdir()
    model.save_weights(str(tmp_path / checkpoints.CHECKPOINT_DIR / checkpoints.BEST_WEIGHTS))
    model.layers[0].kernel.assign(np.zeros((3, 2), "float32"))
    epochs = [
        {"epoch": 1, "phase": "phase1", "val_accuracy": 0.6},
        {"epoch": 2, "phase": "phase1", "val_accuracy": 0.8},
        {"epoch": 3, "phase": "phase2", "val_accuracy": 0.5},
    ]
    best = checkpoints.restore_best_weights(model=model, model_dir=str(tmp_path), epochs=epochs)
    assert best["epoch"] == 2
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.layers[0].kernel), np.ones((3, 2)))
    assert "--fine_tune_learning_rate is likely too high" in caplog.text
    # When the last epoch is the best, nothing is restored.
    epochs.append({"epoch": 4, "phase": "phase2", "val_accuracy": 0.9})
    assert checkpoints.restore_best_weights(model=model, model_dir=str(tmp_path), epochs=epochs) is None


def test_phase_checkpoint_restores_epoch_step_and_weights(tmp_path):
    strategy = tf.distribute.get_strategy()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = keras.optimizers.Adam()
    optimizer.build(model.trainable_variables)
    saved = checkpoints.PhaseCheckpoint(model_dir=str(tmp_path), phase_name="phase1", model=model, optimizer=optimizer,
                                        strategy=strategy, initial_epoch=0)
    assert saved.restore_latest() is None and not checkpoints.has_checkpoint(str(tmp_path), "phase1")
    saved.epoch.assign(3)
    saved.step.assign(7)
    saved.save()
    expected = [weight.copy() for weight in model.get_weights()]
    model.set_weights([np.zeros_like(weight) for weight in expected])
    restored = checkpoints.PhaseCheckpoint(model_dir=str(tmp_path), phase_name="phase1", model=model,
                                           optimizer=optimizer, strategy=strategy, initial_epoch=0)
    assert restored.restore_latest().endswith("ckpt-1")
    assert (int(restored.epoch), int(restored.step)) == (3, 7)
    for weight, value in zip(model.get_weights(), expected):
        np.testing.assert_array_equal(weight, value)
    assert checkpoints.has_checkpoint(str(tmp_path), "phase1") and not checkpoints.has_checkpoint(str(tmp_path), "phase2")


def test_preemption_watcher_turns_sigterm_into_a_flag_and_gives_the_handler_back():
    before = signal.getsignal(signal.SIGTERM)
    with checkpoints.PreemptionWatcher() as watcher:
        assert not watcher.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.requested
    assert signal.getsignal(signal.SIGTERM) == before
