"""trainer/fit/recipe.py: schedules, optimizers, class weights and the loss give the numbers they promise."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.fit import recipe


def rates(schedule, steps):
    return [float(schedule(step)) if callable(schedule) else schedule for step in steps]


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    schedule = recipe.make_learning_rate(schedule="cosine", learning_rate=0.1, total_steps=110, warmup_steps=10)
    assert rates(schedule, [0, 5, 10]) == pytest.approx([0.0, 0.05, 0.1])
    # Halfway through the decay the cosine is at half the peak; at the end it reaches 0.
    assert rates(schedule, [60, 110]) == pytest.approx([0.05, 0.0], abs=1e-7)
    assert float(schedule(35)) == pytest.approx(0.05 * (1 + math.cos(math.pi * 25 / 100)))


def test_constant_schedule_is_a_float_or_a_warmup_to_a_plateau():
    assert recipe.make_learning_rate(schedule="constant", learning_rate=0.01, total_steps=50, warmup_steps=0) == 0.01
    schedule = recipe.make_learning_rate(schedule="constant", learning_rate=0.01, total_steps=50, warmup_steps=4)
    assert rates(schedule, [0, 2, 4, 30, 50]) == pytest.approx([0.0, 0.005, 0.01, 0.01, 0.01])


def test_cosine_without_warmup_starts_at_the_peak():
    schedule = recipe.make_learning_rate(schedule="cosine", learning_rate=0.2, total_steps=8, warmup_steps=0)
    assert rates(schedule, [0, 4, 8]) == pytest.approx([0.2, 0.1, 0.0], abs=1e-7)


def test_unknown_schedule_and_optimizer_are_clear_errors():
    with pytest.raises(ValueError, match="--lr_schedule 'step'"):
        recipe.make_learning_rate(schedule="step", learning_rate=0.1, total_steps=10, warmup_steps=0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="--optimizer 'adagrad' is not one of"):
        recipe.make_optimizer(name="adagrad", learning_rate=0.1, weight_decay=0.0, precision="float32", model=model)


@pytest.mark.parametrize("name", recipe.OPTIMIZERS)
def test_every_optimizer_builds_and_decays_kernels_but_not_biases(name):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_initializer="ones", bias_initializer="ones")])
    optimizer = recipe.make_optimizer(name=name, learning_rate=0.5, weight_decay=0.1, precision="float32", model=model)
    zeros = [tf.zeros_like(variable) for variable in model.trainable_variables]
    optimizer.apply_gradients(zip(zeros, model.trainable_variables))
    kernel, bias = (keras.ops.convert_to_numpy(variable) for variable in model.trainable_variables)
    # With zero gradients only the decoupled weight decay moves a weight: kernel * (1 - lr * decay).
    np.testing.assert_allclose(kernel, 1 - 0.5 * 0.1, rtol=1e-6)
    np.testing.assert_allclose(bias, 1.0)


def test_mixed_float16_wraps_the_optimizer_for_loss_scaling():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = recipe.make_optimizer(name="adam", learning_rate=0.1, weight_decay=0.0, precision="mixed_float16", model=model)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def test_balanced_class_weights_give_every_class_the_same_total_weight():
    counts = {"cat": 90, "dog": 9, "fox": 1}
    weights = recipe.class_weights(mode="balanced", class_counts=counts, class_names=["cat", "dog", "fox"])
    assert weights == pytest.approx([100 / 270, 100 / 27, 100 / 3])
    assert [weight * counts[name] for weight, name in zip(weights, counts)] == pytest.approx([100 / 3] * 3)
    assert recipe.class_weights(mode="none", class_counts=counts, class_names=["cat"]) is None
    with pytest.raises(ValueError, match=r"classes \['emu'\] have no training examples"):
        recipe.class_weights(mode="balanced", class_counts=counts, class_names=["cat", "emu"])


def test_loss_with_label_smoothing_and_class_weights_matches_hand_computation():
    labels = tf.constant([0, 2])
    probabilities = tf.constant([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    plain = recipe.make_loss_function(label_smoothing=0.0, class_weights=None)(labels, probabilities).numpy()
    np.testing.assert_allclose(plain, [-math.log(0.7), -math.log(0.6)], rtol=1e-5)
    # Smoothing 0.3 over 3 classes: targets 0.8 on the true class, 0.1 elsewhere.
    smoothed = recipe.make_loss_function(label_smoothing=0.3, class_weights=[1.0, 1.0, 2.0])(labels, probabilities).numpy()
    expected_first = -(0.8 * math.log(0.7) + 0.1 * math.log(0.2) + 0.1 * math.log(0.1))
    expected_second = -2 * (0.1 * math.log(0.1) + 0.1 * math.log(0.3) + 0.8 * math.log(0.6))
    np.testing.assert_allclose(smoothed, [expected_first, expected_second], rtol=1e-5)
    with pytest.raises(ValueError, match="--label_smoothing 1.0"):
        recipe.make_loss_function(label_smoothing=1.0, class_weights=None)


def test_ema_momentum_is_capped_so_an_epoch_holds_its_average():
    assert recipe.ema_momentum_for(0.99, steps_per_epoch=1000) == 0.99
    assert recipe.ema_momentum_for(0.99, steps_per_epoch=10) == pytest.approx(0.8)
    assert recipe.ema_momentum_for(0.99, steps_per_epoch=1) == 0.0
    with pytest.raises(ValueError, match="--ema_momentum"):
        recipe.Recipe(ema_momentum=1.0)


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_ema_turns_the_weights_into_their_moving_average_at_the_end_of_each_epoch(name):
    steps_per_epoch = 5
    fine_tuning = recipe.Recipe(lr_schedule="constant", warmup_fraction=0.0, ema_momentum=0.99)
    momentum = recipe.ema_momentum_for(0.99, steps_per_epoch)

    def train(ema_steps_per_epoch):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
        optimizer = fine_tuning.optimizer(name=name, learning_rate=0.1, total_steps=2 * steps_per_epoch,
                                          precision="float32", model=model, ema_steps_per_epoch=ema_steps_per_epoch)
        kernel, iterates = model.trainable_variables[0], []
        for step in range(steps_per_epoch + 2):
            optimizer.apply([tf.fill([2, 1], float(step + 1))], [kernel])
            iterates.append(kernel.numpy().copy())
        return iterates

    plain, averaged = train(None), train(steps_per_epoch)
    expected = plain[0]
    for weights in plain[1:steps_per_epoch]:
        expected = momentum * expected + (1 - momentum) * weights
    # Within the epoch the steps are the plain optimizer's; at its last step the weights become the average.
    np.testing.assert_allclose(averaged[: steps_per_epoch - 1], plain[: steps_per_epoch - 1], rtol=1e-6)
    np.testing.assert_allclose(averaged[steps_per_epoch - 1], expected, rtol=1e-5)
    assert not np.allclose(expected, plain[steps_per_epoch - 1])
    # The next epoch trains on from the average.
    assert not np.allclose(averaged[steps_per_epoch], plain[steps_per_epoch])
