"""trainer/exports/export.py: the SavedModel signatures and the TFLite models label images like the Keras model."""

import io
import os
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers
from PIL import Image

from tests.conftest import FLOWERS_DIR
from trainer.exports import export
from trainer.input import data
from trainer.models import classifier

CLASS_NAMES = ["cat", "dog", "fox"]
IMAGE_SIZE = 32
OUTPUT_NAMES = [
    "class_ids", "class_names", "probabilities", "top_k_class_ids", "top_k_class_names", "top_k_probabilities"
]
# Sizes (height, width) that exercise both resize branches: plain bilinear, and antialiased (> 2x shrink).
IMAGE_SIZES = [(45, 60), (150, 100)]


def encode(seed: int, image_format: str, size=(45, 60), smooth: bool = False, **save_options) -> bytes:
    """A random RGB image of `size` (height, width) encoded as `image_format`.

    Args:
        smooth: upsample coarse noise instead, so the image has a photo's low-frequency content.
        **save_options: passed to PIL's `Image.save`, e.g. `subsampling=0` for a 4:4:4 JPEG.
    """
    rng = np.random.default_rng(seed)
    if smooth:
        coarse = rng.integers(0, 256, (size[0] // 8 + 1, size[1] // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size[1], size[0]), Image.BILINEAR)
    else:
        image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_options)
    return buffer.getvalue()


def real_jpeg() -> bytes:
    """The first photo of the first class of ../shared/data/flowers_small, else a generated JPEG."""
    if FLOWERS_DIR.exists():
        first_class = sorted(path for path in FLOWERS_DIR.iterdir() if path.is_dir())[0]
        return sorted(first_class.glob("*.jpg"))[0].read_bytes()
    return encode(7, "JPEG", size=(240, 320), smooth=True, subsampling=0)


def prepare(encoded: list[bytes]) -> np.ndarray:
    return np.stack([data.decode_and_resize(tf.constant(item), IMAGE_SIZE).numpy() for item in encoded])


def spread_the_head(model: keras.Model, images: np.ndarray, seed: int = 0) -> None:
    """Sets the classifier so its logits vary by about +-1 over `images`, centred on their mean features.

    With weights="none" the pooled features of different images are nearly equal, so an untouched head
    gives every image about 1/3 per class and every comparison below would pass trivially.
    """
    features = keras.Model(model.input, model.get_layer("pool").output)(images, training=False).numpy()
    head = model.get_layer("classifier")
    scale = np.sqrt(features.shape[1]) * features.std(axis=0).mean()
    weights = (np.random.default_rng(seed).normal(0.0, 1.0, head.kernel.shape) / scale).astype(np.float32)
    head.kernel.assign(weights)
    head.bias.assign(-(features.mean(axis=0) @ weights))


def build_small_classifier(images: np.ndarray) -> keras.Model:
    """A classifier with the real model's contract ([0, 255] pixels in, probabilities out), two conv layers deep.

    Shallow on purpose: a deep untrained backbone is chaotic (one grey level of noise moves its
    probabilities by ~0.1), so int8 rounding would swamp the comparisons; a trained one, or this, is not.
    Its second convolution (18k weights) is big enough for dynamic-range quantization to store it as int8.
    """
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), name="image")
    x = classifier.Preprocess("tf", name="preprocess")(inputs)
    x = layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    x = layers.Conv2D(64, 3, strides=2, activation="relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(len(CLASS_NAMES), activation="softmax", name="classifier")(x)
    model = keras.Model(inputs, outputs)
    spread_the_head(model, images)
    return model


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    """Model-ready float32 [n, 32, 32, 3] pixels: a real photo and generated photo-like images of several sizes."""
    generated = [encode(seed, "JPEG", size=(40 + 30 * seed, 100 - 10 * seed), smooth=True) for seed in range(7)]
    return prepare([real_jpeg()] + generated)


@pytest.fixture(scope="module")
def model(test_images):
    return build_small_classifier(test_images)


@pytest.fixture(scope="module")
def export_dir(model, tmp_path_factory) -> str:
    export_dir = str(tmp_path_factory.mktemp("export") / export.SAVED_MODEL_DIR)
    export.export_saved_model(model=model, class_names=CLASS_NAMES, image_size=IMAGE_SIZE, export_dir=export_dir)
    return export_dir


@pytest.fixture(scope="module")
def serve_bytes(export_dir):
    return export.load_serving_function(export_dir)


@pytest.fixture(scope="module")
def serve_images(export_dir):
    return export.load_serving_function(export_dir, export.IMAGES_SIGNATURE)


def test_the_test_model_gives_varied_confident_predictions(model, test_images):
    probabilities = model(test_images, training=False).numpy()
    assert probabilities.max() > 0.6 and len(set(probabilities.argmax(axis=1))) > 1


def test_bytes_signature_matches_the_keras_model_for_every_format(model, serve_bytes):
    encoded = [real_jpeg(), encode(0, "JPEG"), encode(1, "PNG", size=(80, 20)), encode(2, "GIF"), encode(3, "BMP")]
    outputs = {name: value.numpy() for name, value in serve_bytes(image_bytes=tf.constant(encoded)).items()}
    assert sorted(outputs) == OUTPUT_NAMES
    expected = model(prepare(encoded), training=False).numpy()
    np.testing.assert_allclose(outputs["probabilities"], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(outputs["class_ids"], expected.argmax(axis=1))
    assert [name.decode() for name in outputs["class_names"]] == [CLASS_NAMES[i] for i in outputs["class_ids"]]
    # k = min(top_k=5, 3 classes): every class, best first.
    assert outputs["top_k_class_ids"].shape == (len(encoded), len(CLASS_NAMES))
    np.testing.assert_array_equal(outputs["top_k_class_ids"], np.argsort(-expected, axis=1, kind="stable"))
    np.testing.assert_array_equal(outputs["top_k_class_ids"][:, 0], outputs["class_ids"])
    np.testing.assert_allclose(
        outputs["top_k_probabilities"], np.take_along_axis(outputs["probabilities"], outputs["top_k_class_ids"], axis=1)
    )
    top_k_names = [[name.decode() for name in row] for row in outputs["top_k_class_names"]]
    assert top_k_names == [[CLASS_NAMES[i] for i in row] for row in outputs["top_k_class_ids"]]


@pytest.mark.parametrize("size", IMAGE_SIZES)
def test_crop_and_resize_matches_decode_and_resize(size):
    encoded = encode(4, "PNG", size=size)
    expected = data.decode_and_resize(tf.constant(encoded), IMAGE_SIZE)
    images = tf.io.decode_png(encoded, channels=3)[tf.newaxis]
    np.testing.assert_array_equal(export.crop_and_resize(images, IMAGE_SIZE)[0].numpy(), expected.numpy())
    in_graph = tf.function(lambda images: export.crop_and_resize(images, IMAGE_SIZE))
    np.testing.assert_array_equal(in_graph(images)[0].numpy(), expected.numpy())


# The bytes path decodes only the crop window of a JPEG (decode_and_crop_jpeg). With full-resolution colour
# (4:4:4) that gives exactly the pixels of a full decode; with the usual half-resolution colour (4:2:0),
# upsampling the colour at the window's edges can move a few edge pixels by some grey levels. Below twice
# the image size no DCT scaling happens, so the two signatures agree to these tolerances.
@pytest.mark.parametrize("size", [(45, 60), (70, 50)])
@pytest.mark.parametrize("subsampling, tolerance", [(0, 1e-5), (2, 2e-3)], ids=["4:4:4", "4:2:0"])
def test_images_signature_matches_the_bytes_signature(serve_bytes, serve_images, size, subsampling, tolerance):
    encoded = [encode(seed, "JPEG", size=size, smooth=True, subsampling=subsampling) for seed in (5, 6)]
    from_bytes = serve_bytes(image_bytes=tf.constant(encoded))
    from_images = serve_images(images=tf.stack([tf.io.decode_jpeg(item, channels=3) for item in encoded]))
    assert sorted(from_images) == OUTPUT_NAMES
    np.testing.assert_allclose(from_images["probabilities"], from_bytes["probabilities"], atol=tolerance)
    np.testing.assert_array_equal(from_images["class_ids"], from_bytes["class_ids"])
    np.testing.assert_array_equal(from_images["top_k_class_names"], from_bytes["top_k_class_names"])


def test_images_signature_takes_a_decoded_photo_like_its_file(serve_bytes, serve_images):
    # 240 x 320: the bytes signature decodes it at 1/4 scale in the DCT (as evaluation does), the uint8
    # signature resizes the full pixels it is given; on a smooth photo-like image they agree closely
    # (README: on real phone-size photos, the same top-1 label for 96-99% of images).
    encoded = real_jpeg()
    from_bytes = serve_bytes(image_bytes=tf.constant([encoded]))
    from_images = serve_images(images=tf.io.decode_jpeg(encoded, channels=3)[tf.newaxis])
    np.testing.assert_allclose(from_images["probabilities"], from_bytes["probabilities"], atol=1e-2)  # 6.6e-3 seen
    np.testing.assert_array_equal(from_images["class_names"], from_bytes["class_names"])
    exact = data.decode_and_resize(tf.constant(encoded), IMAGE_SIZE, dct_scale=False)
    scaled = data.decode_and_resize(tf.constant(encoded), IMAGE_SIZE)
    assert 0 < np.abs(scaled.numpy() - exact.numpy()).mean() < 2.0  # the DCT scale did apply, and stays close


def test_loading_a_folder_without_a_saved_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no SavedModel in"):
        export.load_serving_function(str(tmp_path))


def test_loading_an_unknown_signature_names_the_ones_there(export_dir):
    with pytest.raises(ValueError, match=r"no signature 'serve'.*\['serving_default', 'serving_images'\]"):
        export.load_serving_function(export_dir, "serve")


def test_top_k_below_one_is_rejected(model, tmp_path):
    with pytest.raises(ValueError, match="top_k 0 must be at least 1"):
        export.export_saved_model(
            model=model, class_names=CLASS_NAMES, image_size=IMAGE_SIZE, export_dir=str(tmp_path), top_k=0
        )


def saved_model_cli() -> str:
    path = shutil.which("saved_model_cli") or os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(path):
        pytest.skip("saved_model_cli is not installed beside this Python")
    return path


def run_saved_model_cli(*args: str) -> str:
    result = subprocess.run([saved_model_cli(), *args], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def printed_output(stdout: str, name: str) -> str:
    """The value saved_model_cli printed for output `name` (the text after 'Result for output key')."""
    match = re.search(rf"Result for output key {name}:\n(.*?)(?=\nResult for output key|\Z)", stdout, re.S)
    assert match, f"no output {name!r} in:\n{stdout}"
    return match.group(1).strip()


def test_saved_model_cli_labels_a_real_jpeg_like_the_python_signature(export_dir, serve_bytes, tmp_path):
    encoded = real_jpeg()
    # saved_model_cli evaluates --input_exprs with ast.literal_eval (open(...) is refused), so the bytes go
    # through a .npy file of a one-element object array, the way the module docstring tells users to.
    inputs_path = tmp_path / "image_bytes.npy"
    np.save(inputs_path, np.array([encoded], dtype=object))
    stdout = run_saved_model_cli(
        "run", "--dir", export_dir, "--tag_set", "serve", "--signature_def", export.BYTES_SIGNATURE,
        "--inputs", f"image_bytes={inputs_path}",
    )
    expected = {name: value.numpy() for name, value in serve_bytes(image_bytes=tf.constant([encoded])).items()}
    assert printed_output(stdout, "class_ids") == f"[{expected['class_ids'][0]}]"
    assert printed_output(stdout, "class_names") == f"[{expected['class_names'][0]!r}]"
    printed_top_k = re.findall(r"b'(\w+)'", printed_output(stdout, "top_k_class_names"))
    assert printed_top_k == [name.decode() for name in expected["top_k_class_names"][0]]
    printed_probabilities = np.array(printed_output(stdout, "probabilities").strip("[]").split(), dtype=np.float32)
    np.testing.assert_allclose(printed_probabilities, expected["probabilities"][0], atol=1e-5)


def test_the_saved_model_stores_each_weight_once(model, export_dir):
    # keras.export.ExportArchive stored every weight twice (keras-team/keras#23553): twice the file and the memory.
    reader = tf.train.load_checkpoint(os.path.join(export_dir, "variables", "variables"))
    stored = sum(int(np.prod(shape)) for name, shape in reader.get_variable_to_shape_map().items()
                 if name != "_CHECKPOINTABLE_OBJECT_GRAPH")
    assert stored == model.count_params()


def test_saved_model_cli_shows_both_signatures(export_dir):
    stdout = run_saved_model_cli("show", "--dir", export_dir, "--all")
    assert "signature_def['serving_default']" in stdout and "signature_def['serving_images']" in stdout
    assert "inputs['image_bytes']" in stdout and "inputs['images']" in stdout
    for name in OUTPUT_NAMES:
        assert f"outputs['{name}']" in stdout


@pytest.fixture(scope="module")
def tflite_dir(model, tmp_path_factory, calibration_images) -> str:
    output_dir = str(tmp_path_factory.mktemp("tflite"))
    for quantization in export.TFLITE_FILES:
        export.export_tflite(
            model=model, class_names=CLASS_NAMES, image_size=IMAGE_SIZE, output_dir=output_dir,
            quantization=quantization, calibration_images=calibration_images,
        )
    return output_dir


@pytest.fixture(scope="module")
def calibration_images() -> np.ndarray:
    """Photo-like images other than test_images (as train images are), to calibrate the int8 file."""
    return prepare([encode(seed, "JPEG", size=(48, 64), smooth=True) for seed in range(20, 52)])


def tflite_probabilities(tflite_dir: str, quantization: str, images: np.ndarray) -> np.ndarray:
    interpreter = export.load_tflite_interpreter(os.path.join(tflite_dir, export.TFLITE_FILES[quantization]))
    (input_details,) = interpreter.get_input_details()
    assert list(input_details["shape"]) == [1, IMAGE_SIZE, IMAGE_SIZE, 3] and input_details["dtype"] == np.float32
    return export.predict_tflite(interpreter=interpreter, images=images)


def test_float_tflite_matches_the_keras_model(model, tflite_dir, test_images):
    expected = model(test_images, training=False).numpy()
    np.testing.assert_allclose(tflite_probabilities(tflite_dir, "float", test_images), expected, atol=1e-4)


def test_dynamic_range_tflite_is_smaller_and_agrees_with_the_keras_model(model, tflite_dir, test_images):
    expected = model(test_images, training=False).numpy()
    probabilities = tflite_probabilities(tflite_dir, "dynamic_range", test_images)
    np.testing.assert_allclose(probabilities, expected, atol=0.05)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), expected.argmax(axis=1))
    float_size = os.path.getsize(os.path.join(tflite_dir, export.TFLITE_FILES["float"]))
    quantized_size = os.path.getsize(os.path.join(tflite_dir, export.TFLITE_FILES["dynamic_range"]))
    assert quantized_size < 0.5 * float_size  # int8 weights: about a quarter of float32


def test_int8_tflite_takes_and_gives_uint8_and_agrees_with_the_keras_model(model, tflite_dir, test_images):
    interpreter = export.load_tflite_interpreter(os.path.join(tflite_dir, export.TFLITE_FILES["int8"]))
    (input_details,), (output_details,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert input_details["dtype"] == np.uint8 and output_details["dtype"] == np.uint8
    assert list(input_details["shape"]) == [1, IMAGE_SIZE, IMAGE_SIZE, 3]
    # Calibrated on pixels in [0, 255]: about one pixel level per input step; softmax outputs in 1/256 steps.
    input_scale, _ = input_details["quantization"]
    assert 0.5 < input_scale < 1.5, input_details["quantization"]
    assert output_details["quantization"] == pytest.approx((1 / 256, 0))
    expected = model(test_images, training=False).numpy()
    probabilities = export.predict_tflite(interpreter=interpreter, images=test_images)
    np.testing.assert_allclose(probabilities, expected, atol=0.1)
    assert np.mean(probabilities.argmax(axis=1) == expected.argmax(axis=1)) >= 0.75
    assert np.all(np.isin(probabilities * 256, np.arange(257)))  # dequantized: whole steps of 1/256
    float_size = os.path.getsize(os.path.join(tflite_dir, export.TFLITE_FILES["float"]))
    assert os.path.getsize(os.path.join(tflite_dir, export.TFLITE_FILES["int8"])) < 0.5 * float_size


def test_int8_tflite_without_calibration_images_is_a_clear_error(model, tmp_path):
    with pytest.raises(ValueError, match="int8 TFLite file needs calibration_images"):
        export.export_tflite(
            model=model, class_names=CLASS_NAMES, image_size=IMAGE_SIZE, output_dir=str(tmp_path), quantization="int8"
        )
    assert not os.listdir(tmp_path)


def test_quantize_rounds_and_clips_to_the_tensor_type_and_dequantize_inverts_it():
    details = {"dtype": np.uint8, "quantization": (0.5, 10)}
    np.testing.assert_array_equal(export.quantize(np.array([0.0, 1.2, 200.0, -30.0]), details), [10, 12, 255, 0])
    np.testing.assert_allclose(export.dequantize(np.array([10, 12, 255], np.uint8), details), [0.0, 1.0, 122.5])
    float_details = {"dtype": np.float32, "quantization": (0.0, 0)}
    assert export.quantize(np.array([1.5]), float_details).dtype == np.float32


def test_export_tflite_flag_values_parse_to_kinds():
    assert export.parse_tflite_kinds("true") == ("float", "dynamic_range")  # the bare flag, as before
    assert export.parse_tflite_kinds("false") == () and export.parse_tflite_kinds("") == ()
    assert export.parse_tflite_kinds("int8, float,int8") == ("int8", "float")
    with pytest.raises(ValueError, match=r"\['int4'\] not one of \['float', 'dynamic_range', 'int8'\]"):
        export.parse_tflite_kinds("float,int4")
    with pytest.raises(ValueError, match="--tflite_calibration_images=0"):
        export.ExportOptions(tflite=("int8",), calibration_images=0)
    with pytest.raises(ValueError, match="--export_tolerance"):
        export.ExportOptions(tolerance=-0.1)


def test_labels_file_lists_the_class_names_in_label_order(tflite_dir):
    with open(os.path.join(tflite_dir, export.LABELS_FILE)) as file:
        assert file.read().splitlines() == CLASS_NAMES


def test_a_real_backbone_converts_to_float_tflite(tmp_path, test_images):
    model = classifier.build_model(
        classifier.ModelSpec(
            backbone="mobilenet_v2", image_size=IMAGE_SIZE, weights="none", preprocess="tf", dropout=0.0,
        ),
        num_classes=3,
    )
    # Untrained, its glorot kernels shrink the features to ~1e-12; He-normal ones keep them near unit scale.
    rng = np.random.default_rng(0)
    for layer in classifier.get_backbone(model).layers:
        if isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D)):
            kernel = layer.kernel
            depthwise = isinstance(layer, layers.DepthwiseConv2D)
            fan_in = np.prod(kernel.shape[:2]) * (1 if depthwise else kernel.shape[2])
            kernel.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), kernel.shape).astype(np.float32))
    spread_the_head(model, test_images)
    tflite_path = export.export_tflite(
        model=model, class_names=CLASS_NAMES, image_size=IMAGE_SIZE, output_dir=str(tmp_path), quantization="float"
    )
    assert tflite_path == str(tmp_path / export.TFLITE_FILES["float"])
    probabilities = export.predict_tflite(interpreter=export.load_tflite_interpreter(tflite_path), images=test_images)
    expected = model(test_images, training=False).numpy()
    assert len(set(expected.argmax(axis=1))) > 1
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)


def test_a_mixed_precision_model_converts_from_its_float32_copy(test_images, tmp_path):
    global_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_small_classifier(test_images)
    finally:
        keras.config.set_dtype_policy(global_policy)
    copy = classifier.float32_copy(model)
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    assert classifier.float32_copy(copy) is copy
    tflite_path = export.export_tflite(
        model=model, class_names=CLASS_NAMES, image_size=IMAGE_SIZE, output_dir=str(tmp_path), quantization="float"
    )
    probabilities = export.predict_tflite(interpreter=export.load_tflite_interpreter(tflite_path), images=test_images)
    np.testing.assert_allclose(probabilities, copy(test_images, training=False).numpy(), atol=1e-4)
    # bfloat16 keeps about 3 significant digits: the mixed model itself agrees only roughly.
    np.testing.assert_allclose(probabilities, model(test_images, training=False).numpy(), atol=0.05)


def test_unknown_quantization_names_the_choices(model, tmp_path):
    with pytest.raises(ValueError, match=r"quantization 'int4' is not one of \['float', 'dynamic_range', 'int8'\]"):
        export.export_tflite(
            model=model, class_names=CLASS_NAMES, image_size=IMAGE_SIZE, output_dir=str(tmp_path), quantization="int4"
        )
    assert not os.listdir(tmp_path)


def test_tflite_input_of_the_wrong_size_is_a_clear_error(tflite_dir):
    interpreter = export.load_tflite_interpreter(os.path.join(tflite_dir, export.TFLITE_FILES["float"]))
    with pytest.raises(ValueError, match=r"images of shape \(1, 64, 64, 3\) do not fit the TFLite input"):
        export.predict_tflite(interpreter=interpreter, images=np.zeros((1, 64, 64, 3), np.float32))


def test_loading_a_missing_tflite_file_is_a_clear_error(tmp_path):
    # The training flag that writes it, not a Python function.
    with pytest.raises(ValueError, match=r"no TFLite model at .*; train with --export_tflite=<kinds> .*float: model.tflite"):
        export.load_tflite_interpreter(str(tmp_path / export.TFLITE_FILES["float"]))


def test_tflite_runs_on_litert_where_it_installs_without_the_deprecation_warning(tflite_dir):
    import importlib.util
    import warnings

    path = os.path.join(tflite_dir, export.TFLITE_FILES["float"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        interpreter = export.load_tflite_interpreter(path)
    litert = importlib.util.find_spec("ai_edge_litert") is not None
    assert type(interpreter).__module__.startswith("ai_edge_litert" if litert else "tensorflow")
    if litert:  # `pip install -e .[test]` brings it on Linux and macOS
        assert not [warning for warning in caught if "deprecated" in str(warning.message).lower()]
