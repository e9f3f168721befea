"""trainer/fit/checkpoints.py: the best-weights guard, phase checkpoints and the SIGTERM watcher."""

import os
import signal

import keras
import numpy as np
import tensorflow as tf

from trainer.fit import checkpoints


def test_best_weights_are_restored_with_a_warning_naming_the_cause(tmp_path, caplog):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_initializer="ones")])
    checkpoints.save_best_weights(model, str(tmp_path), epoch=2)
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


def test_best_weights_of_an_epoch_the_history_lost_are_not_restored(tmp_path, caplog):
    """A run killed after saving an epoch's best weights but before its checkpoint: the rerun's history is cut back
    to the checkpoint, so those weights are not of any epoch it knows, and must not be restored as its best."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_initializer="ones")])
    checkpoints.save_best_weights(model, str(tmp_path), epoch=3)  # the killed run's epoch 3
    model.layers[0].kernel.assign(np.zeros((3, 2), "float32"))
    epochs = [{"epoch": 1, "phase": "phase1", "val_accuracy": 0.8}, {"epoch": 2, "phase": "phase1", "val_accuracy": 0.5}]
    assert checkpoints.restore_best_weights(model=model, model_dir=str(tmp_path), epochs=epochs) is None
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.layers[0].kernel), np.zeros((3, 2)))
    assert "the weights of epoch 1 are not on disk" in caplog.text


def test_a_best_weights_save_killed_half_way_leaves_the_earlier_best(tmp_path, monkeypatch):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_initializer="ones")])
    checkpoints.save_best_weights(model, str(tmp_path), epoch=1)
    model.layers[0].kernel.assign(np.zeros((3, 2), "float32"))

    def killed_while_writing(path):
        with open(path, "wb") as file:
            file.write(b"\x89HDF half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_weights", killed_while_writing)
    try:
        checkpoints.save_best_weights(model, str(tmp_path), epoch=2)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    epochs = [{"epoch": 1, "phase": "phase1", "val_accuracy": 0.8}, {"epoch": 2, "phase": "phase1", "val_accuracy": 0.9},
              {"epoch": 3, "phase": "phase1", "val_accuracy": 0.5}]
    # Epoch 2's file never got its name: not restored (one warning), and epoch 1's is intact.
    assert checkpoints.restore_best_weights(model=model, model_dir=str(tmp_path), epochs=epochs) is None
    assert checkpoints.restore_best_weights(model=model, model_dir=str(tmp_path), epochs=epochs[:1] + epochs[2:])["epoch"] == 1
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.layers[0].kernel), np.ones((3, 2)))
    # The next save removes the half-written file and the older best.
    checkpoints.save_best_weights(model, str(tmp_path), epoch=4)
    assert sorted(os.listdir(tmp_path / checkpoints.CHECKPOINT_DIR)) == ["best_epoch_4.weights.h5"]


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
