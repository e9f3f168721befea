"""trainer/transfer.py and trainer/features.py: the phase plan, cached features, and the best-weights guard."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import data, features, loop, recipe, transfer
from trainer import model as model_lib

IMAGE_SIZE = 32


def test_plan_without_gradual_unfreezing_is_phase1_then_phase2():
    phases = transfer.plan_phases(
        epochs=3, fine_tune_epochs=4, learning_rate=1e-3, fine_tune_learning_rate=1e-4, optimizer="adam",
        fine_tune_optimizer="sgd", fine_tune_at="0.7", fine_tune_fraction=0.7, unfreeze_stages=1,
    )
    assert phases == [
        transfer.Phase("phase1", 0, 3, 1e-3, "adam", None),
        transfer.Phase("phase2", 3, 7, 1e-4, "sgd", "0.7"),
    ]


def test_gradual_unfreezing_goes_deeper_each_stage_and_ends_at_fine_tune_at():
    phases = transfer.plan_phases(
        epochs=2, fine_tune_epochs=6, learning_rate=1e-3, fine_tune_learning_rate=1e-4, optimizer="adam",
        fine_tune_optimizer="adam", fine_tune_at="block5a", fine_tune_fraction=0.4, unfreeze_stages=3,
    )
    assert [phase.name for phase in phases] == ["phase1", "phase2", "phase2-stage2", "phase2-stage3"]
    assert [(phase.first_epoch, phase.last_epoch) for phase in phases] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [phase.fine_tune_at for phase in phases[1:]] == ["0.8000", "0.6000", "block5a"]
    with pytest.raises(ValueError, match="--unfreeze_stages 0"):
        transfer.plan_phases(
            epochs=1, fine_tune_epochs=1, learning_rate=1, fine_tune_learning_rate=1, optimizer="adam",
            fine_tune_optimizer="adam", fine_tune_at="0", fine_tune_fraction=0, unfreeze_stages=0,
        )


def tiny_backbone_file(tmp_path) -> str:
    """A small random convolutional feature extractor saved as a .keras backbone file (varied features)."""
    backbone = keras.Sequential([
        keras.Input((None, None, 3)),
        keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
    ], name="tiny_backbone")
    path = str(tmp_path / "tiny_backbone.keras")
    backbone.save(path)
    return path


def test_split_model_shares_weights_and_gives_the_full_models_output(tmp_path):
    model = model_lib.build_model(
        backbone=tiny_backbone_file(tmp_path), num_classes=3, image_size=IMAGE_SIZE, weights="imagenet",
        preprocess="tf", dropout=0.3,
    )
    feature_model, head = features.split_model(model)
    images = np.random.default_rng(0).uniform(0, 255, (4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    np.testing.assert_allclose(head(feature_model(images)), model(images), rtol=1e-5, atol=1e-6)
    assert {id(weight) for weight in head.weights} <= {id(weight) for weight in model.weights}


def train_phase1(tmp_path, demo_data_dir, backbone_file, cache_features: bool) -> keras.Model:
    """Phase 1 on the whole train split as one batch (order-free), no augmentation, no dropout."""
    manifest = data.read_manifest(str(demo_data_dir))
    num_train = manifest["splits"]["train"]["num_examples"]
    strategy = tf.distribute.get_strategy()
    keras.utils.set_random_seed(1)
    model = model_lib.build_model(
        backbone=backbone_file, num_classes=3, image_size=IMAGE_SIZE, weights="imagenet", preprocess="tf", dropout=0.0
    )

    def make_dataset(split, training):
        return strategy.distribute_datasets_from_function(lambda context: data.make_dataset(
            data_dir=str(demo_data_dir), manifest=manifest, split=split, image_size=IMAGE_SIZE, batch_size=num_train,
            training=training, crop_min_area=1.0, flip=False, seed=3, input_context=context,
            # In order: otherwise a fast image of the next epoch may take a slow one's place in a batch.
            deterministic=True,
        ))

    model_dir = str(tmp_path / ("cached" if cache_features else "slow"))
    preemption = loop.PreemptionWatcher()
    try:
        transfer.run_phases(
            phases=[transfer.Phase("phase1", 0, 4, 0.05, "adam", None)], model=model, strategy=strategy,
            model_dir=model_dir, make_dataset=make_dataset, batch_size=num_train, steps_per_epoch=1,
            num_train_examples=num_train, precision="float32", lr_schedule="constant", warmup_fraction=0.0,
            weight_decay=0.0, loss_function=recipe.make_loss_function(label_smoothing=0.0, class_weights=None),
            cache_features=cache_features, feature_views=4, augmented=False, seed=3, profile_steps=None,
            after_phase=lambda phase, evaluate_on: None,
            loop_arguments=dict(
                history=loop.History(model_dir, True), early_stopping_patience=0, checkpoint_every_steps=0,
                preemption=preemption,
            ),
        )
    finally:
        preemption.close()
    return model


def test_cached_features_train_the_same_head_as_the_slow_path(tmp_path, demo_data_dir):
    backbone_file = tiny_backbone_file(tmp_path)
    slow = train_phase1(tmp_path, demo_data_dir, backbone_file, cache_features=False)
    cached = train_phase1(tmp_path, demo_data_dir, backbone_file, cache_features=True)
    slow_kernel, slow_bias = (keras.ops.convert_to_numpy(w) for w in slow.get_layer("classifier").weights)
    cached_kernel, cached_bias = (keras.ops.convert_to_numpy(w) for w in cached.get_layer("classifier").weights)
    initial = model_lib.build_model(
        backbone=backbone_file, num_classes=3, image_size=IMAGE_SIZE, weights="imagenet", preprocess="tf", dropout=0.0
    )
    # The head did train (4 Adam steps of 0.05 move every weight), and both paths moved it alike.
    assert np.abs(slow_kernel - keras.ops.convert_to_numpy(initial.get_layer("classifier").weights[0])).max() > 0.05
    np.testing.assert_allclose(cached_kernel, slow_kernel, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cached_bias, slow_bias, rtol=1e-4, atol=1e-5)
    # The backbone is untouched by either path.
    for slow_weight, cached_weight in zip(model_lib.get_backbones(slow)[0].weights, model_lib.get_backbones(cached)[0].weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(slow_weight), keras.ops.convert_to_numpy(cached_weight))


def test_best_weights_are_restored_with_a_warning_naming_the_cause(tmp_path, caplog):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_initializer="ones")])
    (tmp_path / loop.CHECKPOINT_DIR).mkdir()
    model.save_weights(str(tmp_path / loop.CHECKPOINT_DIR / loop.BEST_WEIGHTS))
    model.layers[0].kernel.assign(np.zeros((3, 2), "float32"))
    history = loop.History(str(tmp_path), chief=False)
    history.epochs = [
        {"epoch": 1, "phase": "phase1", "val_accuracy": 0.6},
        {"epoch": 2, "phase": "phase1", "val_accuracy": 0.8},
        {"epoch": 3, "phase": "phase2", "val_accuracy": 0.5},
    ]
    best = transfer.restore_best_weights(model=model, model_dir=str(tmp_path), history=history)
    assert best["epoch"] == 2
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.layers[0].kernel), np.ones((3, 2)))
    assert "--fine_tune_learning_rate is likely too high" in caplog.text
    # When the last epoch is the best, nothing is restored.
    history.epochs.append({"epoch": 4, "phase": "phase2", "val_accuracy": 0.9})
    assert transfer.restore_best_weights(model=model, model_dir=str(tmp_path), history=history) is None
