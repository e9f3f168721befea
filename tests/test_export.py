"""trainer/export.py and trainer/predict.py: the SavedModel labels encoded images like the Keras model."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer import data, export, predict
from trainer import model as model_lib

CLASS_NAMES = ["cat", "dog", "fox"]
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = model_lib.build_model(
        backbone="mobilenet_v2", num_classes=3, image_size=IMAGE_SIZE, weights="none", preprocess="tf", dropout=0.0
    )
    export_dir = str(tmp_path_factory.mktemp("export") / export.SAVED_MODEL_DIR)
    export.export_saved_model(model=model, class_names=CLASS_NAMES, image_size=IMAGE_SIZE, export_dir=export_dir)
    return model, export_dir


def encode(seed: int, image_format: str, size=(45, 60)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def test_serving_signature_matches_the_keras_model(exported):
    model, export_dir = exported
    serve = export.load_serving_function(export_dir)
    encoded = [encode(0, "JPEG"), encode(1, "PNG", size=(80, 20))]
    outputs = serve(image_bytes=tf.constant(encoded))
    assert sorted(outputs) == ["class_ids", "class_names", "probabilities"]
    images = tf.stack([data.decode_and_resize(tf.constant(item), IMAGE_SIZE) for item in encoded])
    expected = model(images, training=False).numpy()
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, rtol=1e-4, atol=1e-6)
    class_ids = outputs["class_ids"].numpy()
    np.testing.assert_array_equal(class_ids, expected.argmax(axis=1))
    assert [name.decode() for name in outputs["class_names"].numpy()] == [CLASS_NAMES[i] for i in class_ids]


def test_loading_a_folder_without_a_saved_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no SavedModel in"):
        export.load_serving_function(str(tmp_path))


def test_predict_file_returns_name_and_probability(exported, tmp_path):
    _, export_dir = exported
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(3, "JPEG"))
    class_name, probability = predict.predict_file(export.load_serving_function(export_dir), str(path))
    assert class_name in CLASS_NAMES and 0.0 < probability <= 1.0


def test_list_images_expands_folders_and_globs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "a" / "one.jpg").write_bytes(b"x")
    (tmp_path / "a" / "deeper").mkdir()
    (tmp_path / "a" / "deeper" / "two.png").write_bytes(b"x")
    (tmp_path / "three.jpg").write_bytes(b"x")
    found = predict.list_images([str(tmp_path / "a"), str(tmp_path / "*.jpg")])
    assert [path.replace(str(tmp_path), "") for path in found] == ["/a/deeper/two.png", "/a/one.jpg", "/three.jpg"]
    with pytest.raises(ValueError, match="neither a file, a folder nor a glob"):
        predict.list_images([str(tmp_path / "missing.jpg")])
