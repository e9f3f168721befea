"""trainer/fit/steps.py: the distributed training and evaluation steps."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.trainer.models.test_classifier import save_tiny_backbone
from trainer.fit import recipe
from trainer.fit import steps
from trainer.models import classifier


def adam(model, precision="float32"):
    return recipe.make_optimizer(name="adam", learning_rate=1e-2, weight_decay=0.0, precision=precision, model=model)


def tiny_model(tmp_path, precision="float32"):
    """A classifier on a tiny saved backbone (16 px, 2 classes), built under `precision`."""
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    backbone = save_tiny_backbone(tmp_path / "tiny_backbone.keras")
    spec = classifier.ModelSpec(backbone=backbone, image_size=16, weights="imagenet", preprocess="tf", dropout=0.0)
    return classifier.build_model(spec, num_classes=2)


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
    classifier.unfreeze_backbone(model, "0")
    optimizer = adam(model, precision)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == (precision == "mixed_float16")
    step, _ = steps.make_train_step(model=model, optimizer=optimizer, strategy=strategy, global_batch_size=8)
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
    step = steps.make_evaluation_step(model=model, strategy=tf.distribute.get_strategy())
    images, labels = separable_batches(3)
    weights = np.full((3, 8), 24 / 20, "float32")
    weights[2, 4:] = 0.0  # the last four examples are padding
    dataset = tf.data.Dataset.from_tensor_slices((images, labels, weights))
    result = steps.evaluate(step, dataset)
    real_images, real_labels = images.reshape(24, 16, 16, 3)[:20], labels.reshape(24)[:20]
    probabilities = model(real_images).numpy()
    expected_loss = keras.losses.SparseCategoricalCrossentropy()(real_labels, probabilities).numpy()
    assert result["loss"] == pytest.approx(float(expected_loss), rel=1e-5)
    assert result["accuracy"] == pytest.approx(float(np.mean(probabilities.argmax(1) == real_labels)))
    # The confusion matrix counts the 20 real examples once each, padding not at all.
    expected_matrix = np.zeros((num_classes, num_classes), int)
    np.add.at(expected_matrix, (real_labels, probabilities.argmax(1)), 1)
    np.testing.assert_array_equal(result["confusion_matrix"], expected_matrix)
