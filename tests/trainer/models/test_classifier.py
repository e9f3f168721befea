"""trainer/models/classifier.py: every backbone builds, preprocessing matches each backbone's own, fine-tuning cuts."""

import importlib

import keras
import numpy as np
import pytest

from tests.conftest import LITE0_BACKBONE
from trainer.models import classifier

TINY_SIZE = 75  # the smallest size every backbone accepts (InceptionV3 needs 75)

# The keras.applications module whose preprocess_input each backbone must match.
PREPROCESS_MODULES = {
    "densenet121": "densenet",
    "efficientnet_b0": "efficientnet",
    # EfficientNet-Lite has no keras.applications module; its [-1, 1] scaling is MobileNetV2's.
    "efficientnet_lite0": "mobilenet_v2",
    "efficientnet_lite1": "mobilenet_v2",
    "efficientnet_lite2": "mobilenet_v2",
    "inception_v3": "inception_v3",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3_small": "mobilenet_v3",
    "nasnet_large": "nasnet",
    "resnet50": "resnet50",
    "vgg19": "vgg19",
    "xception": "xception",
}


def test_every_backbone_has_a_preprocess_reference():
    assert sorted(PREPROCESS_MODULES) == sorted(classifier.BACKBONES)


@pytest.mark.parametrize("backbone", sorted(classifier.BACKBONES))
def test_backbone_builds_and_predicts_probabilities(backbone):
    model = classifier.build_model(
        classifier.ModelSpec(backbone=backbone, image_size=TINY_SIZE, weights="none", preprocess="auto", dropout=0.1),
        num_classes=3,
    )
    images = np.random.default_rng(0).uniform(0, 255, (2, TINY_SIZE, TINY_SIZE, 3)).astype("float32")
    probabilities = keras.ops.convert_to_numpy(model(images, training=False))
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert not classifier.get_backbone(model).trainable
    assert len(model.trainable_weights) == 2  # the classifier's kernel and bias only


@pytest.mark.parametrize("backbone", sorted(classifier.BACKBONES))
def test_preprocess_layer_matches_the_backbones_own_preprocess_input(backbone):
    module = importlib.import_module(f"keras.applications.{PREPROCESS_MODULES[backbone]}")
    images = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = module.preprocess_input(images.copy())
    layer = classifier.Preprocess(classifier.resolve_backbones(backbone)[0].preprocess)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(images)), expected, rtol=1e-5, atol=1e-4)


def image_size(backbone: str, preprocess: str = "auto") -> int:
    return classifier.ModelSpec(backbone=backbone, preprocess=preprocess).image_size


def test_default_image_sizes():
    assert image_size("inception_v3") == 299
    assert image_size("mobilenet_v2") == 224
    assert image_size("nasnet_large") == 331
    assert image_size("some/backbone.keras", "tf") == 224
    assert classifier.ModelSpec(backbone="inception_v3", image_size=96, weights="none").image_size == 96


def test_model_spec_checks_its_flags(tmp_path):
    with pytest.raises(ValueError, match="--weights '.*missing.h5' is neither imagenet, none nor an existing weights file"):
        classifier.ModelSpec(weights=str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match="--backbone_layer 'mixed7' cannot apply to ensemble"):
        classifier.ModelSpec(backbone="inception_v3+xception", backbone_layer="mixed7")
    with pytest.raises(ValueError, match="--dropout 1.5 must be within"):
        classifier.ModelSpec(dropout=1.5)
    with pytest.raises(ValueError, match="--image_size -1 must be positive, or 0 for the backbone's default"):
        classifier.ModelSpec(image_size=-1)
    spec = classifier.ModelSpec(backbone="inception_v3+resnet50", weights="none")
    assert [member.name for member in spec.backbones] == ["inception_v3", "resnet50"]
    assert spec.preprocess_modes == "tf+caffe" and spec.name == "inception_v3+resnet50"


def test_unknown_backbone_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"--backbone 'resnet5' is not a known backbone.*mobilenet_v2"):
        classifier.check_backbone_name("resnet5")


def test_backbone_file_needs_an_explicit_preprocess():
    with pytest.raises(ValueError, match="--preprocess=auto cannot know"):
        classifier.resolve_backbones("my_backbone.keras", "auto")
    assert classifier.resolve_backbones("my_backbone.keras", "torch")[0].preprocess == "torch"


def test_missing_backbone_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        classifier.make_backbone(str(tmp_path / "missing.keras"), image_size=32, weights="imagenet")


@pytest.fixture(scope="module")
def small_model():
    return classifier.build_model(
        classifier.ModelSpec(backbone="mobilenet_v2", image_size=32, weights="none", preprocess="tf", dropout=0.0),
        num_classes=3,
    )


def test_fine_tune_at_accepts_index_fraction_and_name(small_model):
    backbone = classifier.get_backbone(small_model)
    num_layers = len(backbone.layers)
    assert classifier.resolve_fine_tune_at(backbone, "100") == 100
    assert classifier.resolve_fine_tune_at(backbone, "-10") == num_layers - 10
    assert classifier.resolve_fine_tune_at(backbone, "0.5") == round(0.5 * num_layers)
    assert classifier.resolve_fine_tune_at(backbone, "0") == 0
    assert classifier.resolve_fine_tune_at(backbone, "block_16_expand") == [
        layer.name for layer in backbone.layers
    ].index("block_16_expand")
    with pytest.raises(ValueError, match="--fine_tune_at 'no_such_layer' is not a layer"):
        classifier.resolve_fine_tune_at(backbone, "no_such_layer")
    with pytest.raises(ValueError, match="outside the backbone"):
        classifier.resolve_fine_tune_at(backbone, str(num_layers + 1))
    with pytest.raises(ValueError, match="within"):
        classifier.resolve_fine_tune_at(backbone, "1.5")


def test_unfreeze_keeps_batchnorm_and_the_bottom_frozen():
    model = classifier.build_model(
        classifier.ModelSpec(backbone="mobilenet_v2", image_size=32, weights="none", preprocess="tf", dropout=0.0),
        num_classes=3,
    )
    start = classifier.unfreeze_backbone(model, "0.5")
    backbone = classifier.get_backbone(model)
    for index, layer in enumerate(backbone.layers):
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable, layer.name
        elif layer.weights:
            assert layer.trainable == (index >= start), layer.name
    assert any(layer.trainable for layer in backbone.layers)


def save_tiny_backbone(path) -> str:
    """Saves a small Conv-BatchNorm backbone as a .keras file (a stand-in for a pretrained one)."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    keras.Model(inputs, x, name="tiny_backbone").save(path)
    return str(path)


def test_fine_tuning_never_changes_batchnorm_statistics(tmp_path):
    backbone_file = save_tiny_backbone(tmp_path / "tiny_backbone.keras")
    model = classifier.build_model(
        classifier.ModelSpec(backbone=backbone_file, image_size=32, weights="imagenet", preprocess="tf", dropout=0.0),
        num_classes=3,
    )
    classifier.unfreeze_backbone(model, "0")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    backbone = classifier.get_backbone(model)
    statistics = [backbone.get_layer(name).moving_mean for name in ("bn1", "bn2")]
    statistics += [backbone.get_layer(name).moving_variance for name in ("bn1", "bn2")]
    before = [keras.ops.convert_to_numpy(variable) for variable in statistics]
    kernel_before = keras.ops.convert_to_numpy(backbone.get_layer("conv2").kernel)
    rng = np.random.default_rng(0)
    model.fit(rng.uniform(0, 255, (16, 32, 32, 3)), rng.integers(0, 3, 16), epochs=1, batch_size=8, verbose=0)
    for first, variable in zip(before, statistics):
        np.testing.assert_array_equal(first, keras.ops.convert_to_numpy(variable))
    # ...while the unfrozen convolutions did train.
    assert not np.allclose(kernel_before, keras.ops.convert_to_numpy(backbone.get_layer("conv2").kernel))


def test_backbone_from_a_keras_file(tmp_path):
    path = save_tiny_backbone(tmp_path / "tiny_backbone.keras")
    model = classifier.build_model(
        classifier.ModelSpec(backbone=path, image_size=32, weights="imagenet", preprocess="tf", dropout=0.0),
        num_classes=2,
    )
    assert model.output_shape == (None, 2)
    with pytest.raises(ValueError, match="carries its own weights"):
        classifier.make_backbone(path, image_size=32, weights="none")


def test_saved_keras_model_loads_in_safe_mode(tmp_path, small_model):
    path = tmp_path / "model.keras"
    small_model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    images = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(images)), keras.ops.convert_to_numpy(small_model(images)), rtol=1e-5
    )


@pytest.mark.skipif(not LITE0_BACKBONE.exists(), reason="../shared/models is not beside this checkout")
def test_pretrained_backbone_file_from_shared():
    model = classifier.build_model(
        classifier.ModelSpec(
            backbone=str(LITE0_BACKBONE), image_size=96, weights="imagenet", preprocess="tf", dropout=0.2,
        ),
        num_classes=5,
    )
    assert model.output_shape == (None, 5)
    assert len(classifier.get_backbone(model).layers) == 150


def test_device_augmentation_acts_in_training_only_and_saves(tmp_path):
    from trainer.input import data

    augmentation = data.make_augmentation(flip=True, rotation=0.2, contrast=0.3, seed=0)
    model = classifier.build_model(
        classifier.ModelSpec(backbone="mobilenet_v2", image_size=32, weights="none", preprocess="tf", dropout=0.0),
        num_classes=3, augmentation=augmentation,
    )
    names = [layer.name for layer in model.layers]
    assert names.index("preprocess") == 1 + len(augmentation.layers)  # input, augmentation, preprocess
    assert classifier.get_backbone(model) is not None  # still exactly one nested model
    images = np.random.default_rng(3).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    plain = classifier.build_model(
        classifier.ModelSpec(backbone="mobilenet_v2", image_size=32, weights="none", preprocess="tf", dropout=0.0),
        num_classes=3,
    )
    plain.set_weights(model.get_weights())
    inference = keras.ops.convert_to_numpy(model(images, training=False))
    np.testing.assert_allclose(inference, keras.ops.convert_to_numpy(plain(images, training=False)), rtol=1e-5)
    augmented_input = keras.Model(model.input, model.get_layer("preprocess").input)
    assert not np.allclose(keras.ops.convert_to_numpy(augmented_input(images, training=True)), images)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(augmented_input(images, training=False)), images)
    path = tmp_path / "augmented.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(images)), inference, rtol=1e-5)


def test_split_backbones_and_its_errors():
    assert classifier.split_backbones("resnet50") == ["resnet50"]
    assert classifier.split_backbones("inception_v3+xception+resnet50") == ["inception_v3", "xception", "resnet50"]
    with pytest.raises(ValueError, match="has an empty member"):
        classifier.split_backbones("inception_v3++xception")
    with pytest.raises(ValueError, match=r"lists \['xception'\] more than once"):
        classifier.split_backbones("xception+resnet50+xception")
    with pytest.raises(ValueError, match=r"--backbone 'resnet5' \(in ensemble 'xception\+resnet5'\) is not a known"):
        classifier.check_backbone_name("xception+resnet5")


def test_ensemble_image_size_and_preprocess_resolve_per_member():
    def modes(backbone, preprocess="auto"):
        return [member.preprocess for member in classifier.resolve_backbones(backbone, preprocess)]

    assert image_size("inception_v3+xception+resnet50") == 299  # the largest member's
    assert image_size("mobilenet_v2+resnet50") == 224
    assert modes("inception_v3+resnet50+densenet121") == ["tf", "caffe", "torch"]
    assert modes("inception_v3+resnet50", "torch") == ["torch", "torch"]  # explicit: every member
    assert modes("mobilenet_v2") == ["tf"]


def test_ensemble_with_a_backbone_file_needs_an_explicit_preprocess(tmp_path):
    ensemble = f"mobilenet_v2+{tmp_path / 'tiny_backbone.keras'}"
    with pytest.raises(ValueError, match=r"--preprocess=auto cannot know how backbone file .*every member"):
        classifier.resolve_backbones(ensemble, "auto")
    assert [member.preprocess for member in classifier.resolve_backbones(ensemble, "none")] == ["none", "none"]


@pytest.fixture(scope="module")
def ensemble_model():
    backbone = "mobilenet_v2+mobilenet_v3_small"
    return classifier.build_model(
        classifier.ModelSpec(backbone=backbone, image_size=32, weights="none", preprocess="auto", dropout=0.1),
        num_classes=3,
    )


def test_ensemble_has_a_backbone_preprocess_and_pool_per_member(ensemble_model):
    backbones = classifier.get_backbones(ensemble_model)
    assert [backbone.name for backbone in backbones] == ["mobilenet_v2", "mobilenet_v3_small"]
    assert [ensemble_model.get_layer(f"preprocess_{backbone.name}").mode for backbone in backbones] == ["tf", "none"]
    assert ensemble_model.output_shape == (None, 3)
    widths = [backbone.output.shape[-1] for backbone in backbones]
    assert ensemble_model.get_layer("features").output.shape[-1] == sum(widths) == 1280 + 576
    assert len(ensemble_model.trainable_weights) == 2  # the classifier's kernel and bias only
    with pytest.raises(ValueError, match="has 2 backbones.*use get_backbones"):
        classifier.get_backbone(ensemble_model)


def test_ensemble_saves_and_loads_in_safe_mode(tmp_path, ensemble_model):
    path = tmp_path / "ensemble.keras"
    ensemble_model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    images = np.random.default_rng(4).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(images)), keras.ops.convert_to_numpy(ensemble_model(images)), rtol=1e-5
    )
    assert [backbone.name for backbone in classifier.get_backbones(loaded)] == ["mobilenet_v2", "mobilenet_v3_small"]


def test_unfreeze_applies_to_every_backbone_of_an_ensemble(tmp_path):
    first = save_tiny_backbone(tmp_path / "tiny_backbone.keras")
    (tmp_path / "other").mkdir()
    second = save_tiny_backbone(tmp_path / "other" / "tiny_backbone.keras")  # same file name: renamed to stay unique
    model = classifier.build_model(
        classifier.ModelSpec(
            backbone=f"{first}+{second}", image_size=32, weights="imagenet", preprocess="tf", dropout=0.0,
        ),
        num_classes=2,
    )
    backbones = classifier.get_backbones(model)
    assert [backbone.name for backbone in backbones] == ["tiny_backbone", "tiny_backbone_2"]
    with pytest.raises(ValueError, match="outside the backbone 'tiny_backbone'"):
        classifier.unfreeze_backbone(model, "50")
    assert not any(backbone.trainable for backbone in backbones)  # a refused cut changes nothing
    frozen = classifier.unfreeze_backbone(model, "0.5")
    starts = [classifier.resolve_fine_tune_at(backbone, "0.5") for backbone in backbones]
    assert frozen == sum(starts)
    for backbone, start in zip(backbones, starts):
        for index, layer in enumerate(backbone.layers):
            if isinstance(layer, keras.layers.BatchNormalization):
                assert not layer.trainable, (backbone.name, layer.name)
            elif layer.weights:
                assert layer.trainable == (index >= start), (backbone.name, layer.name)
        assert any(layer.trainable for layer in backbone.layers), backbone.name


def test_unfreeze_a_mobilenet_ensemble_by_layer_name_needs_it_in_every_backbone():
    model = classifier.build_model(
        classifier.ModelSpec(
            backbone="mobilenet_v2+mobilenet_v3_small", image_size=32, weights="none", preprocess="auto", dropout=0.0,
        ),
        num_classes=2,
    )
    with pytest.raises(ValueError, match="'block_16_expand' is not a layer of backbone 'mobilenet_v3_small'"):
        classifier.unfreeze_backbone(model, "block_16_expand")
    classifier.unfreeze_backbone(model, "-20")
    for backbone in classifier.get_backbones(model):
        assert not any(layer.trainable for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization))
        assert [layer.trainable for layer in backbone.layers[:-20]] == [False] * (len(backbone.layers) - 20)


def test_backbone_cut_at_a_named_layer():
    backbone = classifier.make_backbone("mobilenet_v2", image_size=32, weights="none", layer_name="block_13_expand_relu")
    assert backbone.name.startswith("mobilenetv2")
    assert backbone.output.shape[-1] == 576
    assert backbone.layers[-1].name == "block_13_expand_relu"
    model = classifier.build_model(
        classifier.ModelSpec(
            backbone="mobilenet_v2", image_size=32, weights="none", preprocess="tf", dropout=0.0, backbone_layer="block_6_expand_relu",
        ),
        num_classes=2,
    )
    assert model.get_layer("pool").input.shape[-1] == 192
    assert classifier.get_backbone(model).layers[-1].name == "block_6_expand_relu"


def test_backbone_cut_errors():
    with pytest.raises(ValueError, match=r"--backbone_layer 'mixed7' is not a layer of backbone .* e\.g\. \['"):
        classifier.make_backbone("mobilenet_v2", image_size=32, weights="none", layer_name="mixed7")
    with pytest.raises(ValueError, match="cannot apply to ensemble"):
        classifier.build_model(
            classifier.ModelSpec(
                backbone="mobilenet_v2+resnet50", image_size=32, weights="none", preprocess="tf", dropout=0.0, backbone_layer="block_6_expand_relu",
            ),
            num_classes=2,
        )


def test_baseline_cnn_trains_and_loads_in_safe_mode(tmp_path):
    keras.utils.set_random_seed(0)
    model = classifier.build_baseline_cnn(num_classes=3, image_size=32, dropout=0.2)
    assert model.name == classifier.BASELINE_CNN_NAME
    assert model.output_shape == (None, 3)
    assert classifier.get_backbones(model) == []
    with pytest.raises(ValueError, match="no pretrained backbone to unfreeze"):
        classifier.unfreeze_backbone(model, "0")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(5)
    images = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    loss = model.train_on_batch(images, rng.integers(0, 3, 8))
    assert np.isfinite(loss)
    path = tmp_path / "baseline_cnn.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(images)), keras.ops.convert_to_numpy(model(images)), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="too small for the baseline CNN"):
        classifier.build_baseline_cnn(num_classes=3, image_size=8, dropout=0.0)
