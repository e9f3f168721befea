"""ONNX export of the classifier (--export_onnx) and running it with ONNX Runtime.

<model_dir>/model.onnx is the same classifier as the SavedModel's `serving_images` minus the crop: input
`images`, float32 [batch, image_size, image_size, 3] RGB pixels in [0, 255] (channels last, already cropped and
resized as trainer.input.data.decode_and_resize does), output `probabilities`, float32 [batch, num_classes] in the
order of labels.txt. The batch dimension is dynamic. The file carries the class names itself, in label-id order:
its metadata_props entry `class_names` holds them as a JSON list (class_names reads them), so trainer.predict
checks the names it prints against the model it runs, not against the labels file beside it.

Written by Keras 3's own `model.export(format="onnx")` (tf2onnx under the TensorFlow backend: the maintained path
for our pinned Keras and TensorFlow), then checked: onnxruntime must load it and give the Keras model's
probabilities on a batch of 2 (ONNX_TOLERANCE). tf2onnx, onnx and onnxruntime are the `onnx` extra
(`pip install imagefolder-transfer[onnx]`); they are imported only when an ONNX file is written or read.
"""

import importlib.util
import json
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from trainer.models import classifier

ONNX_FILE = "model.onnx"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
# The metadata_props key of the class names (a JSON list, in label-id order).
CLASS_NAMES_KEY = "class_names"
# Largest difference of a probability between onnxruntime and Keras on the check batch (float32 rounding).
ONNX_TOLERANCE = 1e-4
INSTALL_HINT = "pip install 'imagefolder-transfer[onnx]' (tf2onnx, onnx, onnxruntime)"


def check_installed() -> None:
    """Raises ValueError naming the pip command when tf2onnx, onnx or onnxruntime is missing."""
    missing = [name for name in ("tf2onnx", "onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"--export_onnx needs {', '.join(missing)}: {INSTALL_HINT}")


def export_onnx(*, model: keras.Model, class_names: list[str], image_size: int, path: str) -> str:
    """Writes the model as ONNX to `path` (local or gs://), renames its tensors, stores the class names in it
    (CLASS_NAMES_KEY), checks it with onnxruntime.

    Raises:
        ValueError: the ONNX packages are missing, or onnxruntime's probabilities differ from Keras's.
    """

    check_installed()
    import onnx
    model = classifier.float32_copy(model)  # Keras's ONNX export takes float32 models only
    signature = [tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name=INPUT_NAME)]
    with tempfile.TemporaryDirectory() as folder:
        local_path = os.path.join(folder, ONNX_FILE)
        model.export(local_path, format="onnx", input_signature=signature, verbose=False)
        graph = onnx.load(local_path)
        _rename_output(graph, OUTPUT_NAME)
        onnx.helper.set_model_props(graph, {CLASS_NAMES_KEY: json.dumps(list(class_names))})
        onnx.checker.check_model(graph)
        onnx.save(graph, local_path)
        check_against_keras(model=model, onnx_path=local_path, image_size=image_size)
        tf.io.gfile.makedirs(os.path.dirname(path) or ".")
        tf.io.gfile.copy(local_path, path, overwrite=True)
    return path


def _rename_output(graph, name: str) -> None:
    """Gives the graph's one output a stable name (tf2onnx names it after the Keras layer)."""
    (output,) = graph.graph.output
    old = output.name
    for node in graph.graph.node:
        node.output[:] = [name if value == old else value for value in node.output]
    output.name = name


def check_against_keras(*, model: keras.Model, onnx_path: str, image_size: int) -> None:
    """Raises ValueError when onnxruntime's probabilities for two images differ from the Keras model's."""
    images = np.random.default_rng(0).uniform(0, 255, (2, image_size, image_size, 3)).astype(np.float32)
    expected = keras.ops.convert_to_numpy(model(images, training=False))
    actual = predict_onnx(session=load_onnx_session(onnx_path), images=images)
    difference = float(np.max(np.abs(actual - expected)))
    if difference > ONNX_TOLERANCE:
        raise ValueError(f"the ONNX model's probabilities differ from the Keras model's by {difference:.2g} "
                         f"(more than {ONNX_TOLERANCE:g}); the conversion lost something: please report it")


def load_onnx_session(path: str):
    """An onnxruntime InferenceSession (CPU) of an ONNX file, local or gs://."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ValueError(f"running an ONNX model needs onnxruntime: {INSTALL_HINT}") from error
    if not tf.io.gfile.exists(path):
        raise ValueError(f"no ONNX model at {path!r}; train with --export_onnx")
    with tf.io.gfile.GFile(path, "rb") as file:
        content = file.read()
    return onnxruntime.InferenceSession(content, providers=["CPUExecutionProvider"])


def class_names(session) -> list[str] | None:
    """The class names an ONNX file carries (export_onnx stores them), or None for a file written without them."""
    stored = session.get_modelmeta().custom_metadata_map.get(CLASS_NAMES_KEY)
    return None if stored is None else json.loads(stored)


def predict_onnx(*, session, images: np.ndarray) -> np.ndarray:
    """Runs the ONNX classifier on float32 [batch, size, size, 3] pixels in [0, 255]; returns [batch, classes]."""
    (model_input,) = session.get_inputs()
    expected = tuple(model_input.shape[1:])
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"images of shape {images.shape} do not fit the ONNX input [batch, {', '.join(map(str, expected))}]; "
                         "crop and resize them first (trainer.input.data.decode_and_resize)")
    (probabilities,) = session.run([OUTPUT_NAME], {model_input.name: images.astype(np.float32)})
    return probabilities
