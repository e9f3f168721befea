"""Shared fixtures: a small generated image folder converted to TFRecords, and ../shared paths."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Converted EfficientNet-Lite weights are cached in the Keras cache folder: the tests' own, not the user's
# (subprocesses inherit it). Set before anything imports Keras.
KERAS_HOME = tempfile.mkdtemp(prefix="tests_keras_home_")
os.environ["KERAS_HOME"] = KERAS_HOME
atexit.register(shutil.rmtree, KERAS_HOME, ignore_errors=True)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
FLOWERS_DIR = SHARED_DIR / "data" / "flowers_small"
LITE0_BACKBONE = SHARED_DIR / "models" / "efficientnet_lite0_imagenet_notop.keras"


@pytest.fixture(scope="session")
def demo_image_dir(tmp_path_factory) -> Path:
    """A generated class-folder image tree: 3 classes x 20 images (JPEG and PNG, 48-120 px)."""
    from tfrecords import demo_images

    folder = tmp_path_factory.mktemp("demo_images")
    demo_images.write_demo_images(str(folder), num_per_class=20, seed=0)
    return folder


@pytest.fixture(scope="session")
def demo_data_dir(demo_image_dir, tmp_path_factory) -> Path:
    """demo_image_dir converted by tfrecords.build: train/validation/test splits, 2 shards each."""
    from tfrecords.run import conversion

    output_dir = tmp_path_factory.mktemp("demo_tfrecords")
    conversion.build(
        conversion.Source(input_dir=str(demo_image_dir)), str(output_dir),
        conversion.ConversionOptions(
            validation_fraction=0.2, test_fraction=0.2, num_shards=2, seed=42, overwrite=True, num_workers=1
        ),
    )
    return output_dir
