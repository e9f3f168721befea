"""trainer/loop.py: the training and evaluation steps, history bookkeeping, and the epoch loop."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.test_model import save_tiny_backbone
from trainer import loop, recipe, train
from trainer import model as model_lib



def adam(model, precision="float32"):
    return recipe.make_optimizer(name="adam", learning_rate=1e-2, weight_decay=0.0, precision=precision, model=model)

def tiny_model(tmp_path, precision="float32"):
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    return model_lib.build_model(
        backbone=save_tiny_backbone(tmp_path / "tiny_backbone.keras"), num_classes=2, image_size=16,
        weights="imagenet", preprocess="tf", dropout=0.0,
    )


def separable_batches(count: int, batch_size: int = 8):
    """Bright images are class 1, dark ones class 0: learnable in a few steps."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (count, batch_size)).astype("int32")
    images = rng.uniform(0, 100, (count, batch_size, 16, 16, 3)).astype("float32") + 150 * labels[..., None, None, None]
    return images, labels


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_train_step_learns_and_reports_sums(tmp_path, precision):
    strategy = tf.distribute.get_strategy()
    model = tiny_model(tmp_path, precision)
    model_lib.unfreeze_backbone(model, "0")
    optimizer = adam(model, precision)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == (precision == "mixed_float16")
    step, _ = loop.make_train_step(model=model, optimizer=optimizer, strategy=strategy, global_batch_size=8)
    images, labels = separable_batches(40)
    losses = []
    for batch_images, batch_labels in zip(images, labels):
        loss_sum, correct, count = step(tf.constant(batch_images), tf.constant(batch_labels)).numpy()
        assert count == 8 and 0 <= correct <= 8
        losses.append(loss_sum / count)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    keras.mixed_precision.set_global_policy("float32")


def test_evaluation_is_exact_with_padding_weights(tmp_path):
    model = tiny_model(tmp_path)
    num_classes = model.output_shape[-1]
    step = loop.make_evaluation_step(model=model, strategy=tf.distribute.get_strategy(), num_classes=num_classes)
    images, labels = separable_batches(3)
    weights = np.full((3, 8), 24 / 20, "float32")
    weights[2, 4:] = 0.0  # the last four examples are padding
    dataset = tf.data.Dataset.from_tensor_slices((images, labels, weights))
    result = loop.evaluate(step, dataset)
    real_images, real_labels = images.reshape(24, 16, 16, 3)[:20], labels.reshape(24)[:20]
    probabilities = model(real_images).numpy()
    expected_loss = keras.losses.SparseCategoricalCrossentropy()(real_labels, probabilities).numpy()
    assert result["loss"] == pytest.approx(float(expected_loss), rel=1e-5)
    assert result["accuracy"] == pytest.approx(float(np.mean(probabilities.argmax(1) == real_labels)))
    # The confusion matrix counts the 20 real examples once each, padding not at all.
    expected_matrix = np.zeros((num_classes, num_classes), int)
    np.add.at(expected_matrix, (real_labels, probabilities.argmax(1)), 1)
    np.testing.assert_array_equal(result["confusion_matrix"], expected_matrix)


def test_history_persists_and_forgets_epochs_past_a_checkpoint(tmp_path):
    history = loop.History(str(tmp_path), chief=True)
    for epoch in (1, 2, 3):
        history.append({"epoch": epoch, "val_accuracy": epoch / 10})
    reloaded = loop.History(str(tmp_path), chief=True)
    assert [entry["epoch"] for entry in reloaded.epochs] == [1, 2, 3]
    reloaded.keep_until(2)
    assert reloaded.best_validation_accuracy() == pytest.approx(0.2)
    assert loop.History(str(tmp_path / "new"), chief=True).best_validation_accuracy() == -np.inf
    not_chief = loop.History(str(tmp_path / "other"), chief=False)
    not_chief.append({"epoch": 1, "val_accuracy": 0.5})
    assert not (tmp_path / "other" / loop.HISTORY_FILE).exists()


@pytest.fixture
def preemption():
    """A SIGTERM watcher that gives the previous handler back: a handler left behind would be inherited
    by the processes later tests fork, which then could not be terminated."""
    watcher = loop.PreemptionWatcher()
    yield watcher
    watcher.close()


def test_train_phase_resumes_from_its_checkpoint(tmp_path, preemption):
    strategy = tf.distribute.get_strategy()
    images, labels = separable_batches(6)
    train_dataset = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
    validation = tf.data.Dataset.from_tensor_slices((images[:2], labels[:2], np.ones((2, 8), "float32")))
    history = loop.History(str(tmp_path / "run"), chief=True)

    def run(epochs):
        model = tiny_model(tmp_path)
        loop.train_phase(
            phase="phase1", model=model, optimizer=adam(model), strategy=strategy,
            model_dir=str(tmp_path / "run"), train_dataset=train_dataset, validation_dataset=validation,
            global_batch_size=8, initial_epoch=0, epochs=epochs, steps_per_epoch=3, history=history,
            early_stopping_patience=0, profile_steps=(2, 3), checkpoint_every_steps=0,
            preemption=preemption,
        )
        return model

    first = run(2)
    second = run(4)  # a new model restored from the epoch-2 checkpoint, then 2 more epochs
    assert [entry["epoch"] for entry in history.epochs] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "run" / loop.HISTORY_FILE).read_text())[-1]["epoch"] == 4
    assert not all(np.array_equal(a, b) for a, b in zip(first.get_weights(), second.get_weights()))
    assert (tmp_path / "run" / loop.CHECKPOINT_DIR / loop.BEST_WEIGHTS).exists()
    # --profile_batches wrote a trace for TensorBoard's profiler.
    assert list((tmp_path / "run" / loop.LOG_DIR / "plugins" / "profile").rglob("*.xplane.pb"))
    third = run(4)  # nothing left to do: restores and returns
    assert all(np.array_equal(a, b) for a, b in zip(second.get_weights(), third.get_weights()))


def test_parse_profile_steps():
    assert train.parse_profile_steps("") is None
    assert train.parse_profile_steps("10,20") == (10, 20)
    for bad in ("10", "a,b", "0,3", "5,2"):
        with pytest.raises(ValueError, match="--profile_batches"):
            train.parse_profile_steps(bad)


@pytest.mark.parametrize("steps_per_execution, jit_compile", [(3, False), (1, True)])
def test_in_graph_steps_and_xla_compilation(tmp_path, steps_per_execution, jit_compile, preemption):
    images, labels = separable_batches(12)
    train_dataset = tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
    validation = tf.data.Dataset.from_tensor_slices((images[:2], labels[:2], np.ones((2, 8), "float32")))
    history = loop.History(str(tmp_path / "run"), chief=True)
    model = tiny_model(tmp_path)
    loop.train_phase(
        phase="phase1", model=model, optimizer=adam(model),
        strategy=tf.distribute.get_strategy(), model_dir=str(tmp_path / "run"), train_dataset=train_dataset,
        validation_dataset=validation, global_batch_size=8, initial_epoch=0, epochs=3, steps_per_epoch=4,
        history=history, early_stopping_patience=0, profile_steps=None, checkpoint_every_steps=2,
        preemption=preemption, steps_per_execution=steps_per_execution, jit_compile=jit_compile,
    )
    assert [entry["epoch"] for entry in history.epochs] == [1, 2, 3]
    waits = [entry["input_wait_fraction"] for entry in history.epochs]
    assert all(wait is None for wait in waits) if steps_per_execution > 1 else all(0 <= wait <= 1 for wait in waits)
    assert history.epochs[-1]["loss"] < history.epochs[0]["loss"]
