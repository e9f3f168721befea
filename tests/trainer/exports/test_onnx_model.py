"""trainer/exports/onnx_model.py: the ONNX file is the Keras classifier, with named tensors and a dynamic batch."""

import numpy as np
import pytest

pytest.importorskip("tf2onnx", reason="the onnx extra is not installed (pip install '.[onnx]')")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install '.[onnx]')")

from tests.trainer.exports.test_export import CLASS_NAMES, IMAGE_SIZE, build_small_classifier, encode, prepare  # noqa: E402
from trainer.exports import onnx_model  # noqa: E402


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return prepare([encode(seed, "JPEG", size=(40 + 9 * seed, 70), smooth=True) for seed in range(5)])


@pytest.fixture(scope="module")
def onnx_file(images, tmp_path_factory):
    model = build_small_classifier(images)
    path = str(tmp_path_factory.mktemp("onnx") / onnx_model.ONNX_FILE)
    assert onnx_model.export_onnx(model=model, class_names=CLASS_NAMES, image_size=IMAGE_SIZE, path=path) == path
    return model, path


def test_onnx_gives_the_keras_probabilities_for_any_batch_size(onnx_file, images):
    model, path = onnx_file
    session = onnx_model.load_onnx_session(path)
    (model_input,), (model_output,) = session.get_inputs(), session.get_outputs()
    assert model_input.name == onnx_model.INPUT_NAME and model_output.name == onnx_model.OUTPUT_NAME
    assert list(model_input.shape[1:]) == [IMAGE_SIZE, IMAGE_SIZE, 3] and model_input.type == "tensor(float)"
    expected = model(images, training=False).numpy()
    assert len(set(expected.argmax(axis=1))) > 1
    for batch in (images[:1], images):
        np.testing.assert_allclose(onnx_model.predict_onnx(session=session, images=batch), expected[: len(batch)],
                                   atol=onnx_model.ONNX_TOLERANCE)


def test_the_onnx_file_carries_its_class_names_in_label_order(onnx_file):
    # trainer.predict checks the names it prints against these, not against a labels file that may be another's.
    session = onnx_model.load_onnx_session(onnx_file[1])
    assert onnx_model.class_names(session) == CLASS_NAMES


def test_onnx_input_of_the_wrong_size_is_a_clear_error(onnx_file):
    session = onnx_model.load_onnx_session(onnx_file[1])
    with pytest.raises(ValueError, match=r"images of shape \(1, 8, 8, 3\) do not fit the ONNX input"):
        onnx_model.predict_onnx(session=session, images=np.zeros((1, 8, 8, 3), np.float32))


def test_loading_a_missing_onnx_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no ONNX model at .*--export_onnx"):
        onnx_model.load_onnx_session(str(tmp_path / onnx_model.ONNX_FILE))


def test_an_onnx_file_that_disagrees_with_the_keras_model_is_refused(onnx_file, images):
    _, path = onnx_file
    other = build_small_classifier(images[::-1] * 0.5)  # other weights: another model behind the same file name
    with pytest.raises(ValueError, match="probabilities differ from the Keras model's"):
        onnx_model.check_against_keras(model=other, onnx_path=path, image_size=IMAGE_SIZE)


def test_missing_onnx_packages_are_named_with_the_pip_command(monkeypatch):
    """train.py checks this before training: finding the packages missing at export would cost the whole run."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "onnxruntime" else real_find_spec(name, *args))
    with pytest.raises(ValueError, match=r"--export_onnx needs onnxruntime: pip install 'imagefolder-transfer\[onnx\]'"):
        onnx_model.check_installed()
