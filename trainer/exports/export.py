r"""Export: a SavedModel a client can send images to, a TFLite model for phones, and the `.keras` model file.

The SavedModel has two signatures, both returning per image the top class (`class_ids`, `class_names`),
all `probabilities`, and the k best (`top_k_class_ids`, `top_k_class_names`, `top_k_probabilities`):

- `serving_default` takes a batch of encoded images (`image_bytes`: JPEG, PNG, GIF or BMP bytes);
- `serving_images` takes a batch of decoded RGB images (`images`: uint8, any height and width).

`serving_default` prepares a file exactly as evaluation does (`trainer.input.data.decode_and_resize`: central crop,
resize, a JPEG of more than twice the image size decoded at 1/2-1/8 scale in the DCT); `serving_images` keeps
the same central crop of the pixels it is given and resizes them (identical below twice the image size, the
same top-1 label for 96-99% of phone-size photos above it). The backbone's preprocessing is inside the
model, so a client sends a file and gets a label. From a shell
(`saved_model_cli` reads inputs as Python literals or `.npy` files, so pass the bytes through a `.npy`):

    python -c 'import numpy as np; np.save("cat.npy", np.array([open("cat.jpg", "rb").read()], object))'
    saved_model_cli run --dir <model_dir>/saved_model --tag_set serve --signature_def serving_default \
        --inputs image_bytes=cat.npy

TFLite (--export_tflite=float,dynamic_range,int8) takes [1, image_size, image_size, 3] pixels (already cropped
and resized) and returns the probabilities; `labels.txt` beside it lists the class names, one per line. The float
and dynamic-range files take float32 pixels in [0, 255]; the full-integer file (int8) takes and returns uint8:
pixels quantized with its input's (scale, zero_point), probabilities dequantized with its output's (read them from
the interpreter's input/output details; predict_tflite does both).
"""

import dataclasses
import tempfile

import keras
import numpy as np
import tensorflow as tf

from tfrecords import schema
from trainer.exports import onnx_model
from trainer.fit import distribute
from trainer.fit import lite_pass
from trainer.input import data
from trainer.models import classifier

SAVED_MODEL_DIR = "saved_model"
KERAS_MODEL_FILE = "model.keras"
# Where a training run puts export_tflite's files: <model_dir>/tflite/{model.tflite, labels.txt, ...}.
TFLITE_DIR = "tflite"
LABELS_FILE = schema.LABELS_FILE
BYTES_SIGNATURE = "serving_default"
IMAGES_SIGNATURE = "serving_images"
DEFAULT_TOP_K = 5
# TFLite file per kind (--export_tflite): "float" keeps float32 weights; "dynamic_range" stores weights as int8
# (about 4x smaller) and quantizes activations on the fly, needing no representative dataset; "int8" is
# full-integer post-training quantization (weights and activations int8, calibrated on train images, uint8 input
# and output): what integer-only hardware (Edge TPU, microcontrollers, many NPUs) runs.
TFLITE_FILES = {"float": "model.tflite", "dynamic_range": "model_dynamic_range.tflite", "int8": "model_int8.tflite"}
# What a bare --export_tflite writes (its meaning before it took a list).
DEFAULT_TFLITE_KINDS = ("float", "dynamic_range")
DEFAULT_CALIBRATION_IMAGES = 200


def parse_tflite_kinds(value: str | bool) -> tuple[str, ...]:
    """--export_tflite's value: "true" (the bare flag) is DEFAULT_TFLITE_KINDS, "false" or "" none, else a comma
    list of TFLITE_FILES' kinds (e.g. "float,int8")."""
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return DEFAULT_TFLITE_KINDS
    if text in ("false", "0", "", "none"):
        return ()
    kinds = tuple(dict.fromkeys(kind.strip() for kind in text.split(",") if kind.strip()))
    unknown = [kind for kind in kinds if kind not in TFLITE_FILES]
    if unknown:
        raise ValueError(f"--export_tflite={value!r}: {unknown} not one of {list(TFLITE_FILES)} (e.g. float,int8)")
    return kinds


def crop_and_resize(images: tf.Tensor, image_size: int, crop_fraction: float = data.EVAL_CROP_FRACTION) -> tf.Tensor:
    """Keeps the central crop of a batch of decoded images and resizes it, as `data.decode_and_resize` does
    for images below twice image_size (above, that function decodes a JPEG at a DCT scale, which needs its bytes).

    It uses `data.decode_and_resize`'s own crop window and resize (antialiased only when shrinking by more
    than 2x), so an image below twice image_size sent decoded gets the probabilities it gets as a file.

    Args:
        images: uint8 [batch, height, width, 3] RGB images (one size for the whole batch).
        image_size: output height and width.
        crop_fraction: share of each side kept around the centre (1.0: the whole image).

    Returns:
        float32 [batch, image_size, image_size, 3] pixels in [0, 255].
    """
    offset, crop = data.central_crop_window(tf.shape(images)[1:3], crop_fraction)
    images = tf.image.crop_to_bounding_box(images, offset[0], offset[1], crop[0], crop[1])
    return data.resize_pixels(images, image_size)


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What a training run exports besides the SavedModel and model.keras (the flags of the same names).

    top_k: how many best classes the SavedModel's top_k_* outputs list (and the report's top-k accuracy).
    tflite: the TFLite files to write into <model_dir>/tflite/ with labels.txt (kinds of TFLITE_FILES).
    calibration_images: train images the int8 file is calibrated on.
    onnx: also write <model_dir>/model.onnx (onnx_model.py).
    tolerance: an export whose accuracy is more than this below the SavedModel's is flagged (export_report.py).
    """

    top_k: int = DEFAULT_TOP_K
    tflite: tuple[str, ...] = ()
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    onnx: bool = False
    tolerance: float = 0.02

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"--top_k {self.top_k} must be at least 1")
        unknown = [kind for kind in self.tflite if kind not in TFLITE_FILES]
        if unknown:
            raise ValueError(f"--export_tflite: {unknown} not one of {list(TFLITE_FILES)}")
        if self.calibration_images < 1:
            raise ValueError(f"--tflite_calibration_images={self.calibration_images} must be at least 1, e.g. 200")
        if not 0 <= self.tolerance <= 1:
            raise ValueError(f"--export_tolerance={self.tolerance} must be within [0, 1], e.g. 0.02")


def export_run(
    *, model: keras.Model, class_names: list[str], model_dir: str, options: ExportOptions, strategy,
    calibration_images: np.ndarray | None = None,
) -> None:
    """Writes a finished run's exports into model_dir: saved_model/, model.keras, labels.txt, [tflite/], [model.onnx].

    Every worker exports the SavedModel (saving may need collectives); only the chief's copy is kept,
    and only the chief writes the rest.

    calibration_images: float32 [n, size, size, 3] train pixels (read_calibration_images), for the int8 file.
    """
    image_size = int(model.input_shape[1])
    export_write_dir = distribute.write_dir(tf.io.gfile.join(model_dir, SAVED_MODEL_DIR), strategy)
    export_saved_model(
        model=model, class_names=class_names, image_size=image_size, export_dir=export_write_dir, top_k=options.top_k
    )
    distribute.remove_write_dir(export_write_dir, strategy)
    if not distribute.is_chief(strategy):
        return
    schema.write_labels(model_dir, class_names)
    model.save(tf.io.gfile.join(model_dir, KERAS_MODEL_FILE))
    for kind in options.tflite:
        export_tflite(model=model, class_names=class_names, image_size=image_size,
                      output_dir=tf.io.gfile.join(model_dir, TFLITE_DIR), quantization=kind,
                      calibration_images=calibration_images)
    if options.onnx:
        onnx_model.export_onnx(model=model, class_names=class_names, image_size=image_size,
                               path=tf.io.gfile.join(model_dir, onnx_model.ONNX_FILE))


def read_calibration_images(*, data_dir: str, manifest: dict, image_size: int, count: int) -> np.ndarray:
    """The first `count` train images as evaluation prepares them (central crop, resize): float32 [n, size, size, 3].

    The converter spreads a class's images over the shards by a hash of their path, so the first images of the
    split are a sample of every class, not the first class's.
    """
    dataset = data.make_dataset(data_dir=data_dir, manifest=manifest, split="train", image_size=image_size,
                                batch_size=min(count, 64), training=False, options=data.standalone_options())
    images = []
    for batch, _, weights in dataset:
        images.extend(batch.numpy()[weights.numpy() > 0])
        if len(images) >= count:
            break
    return np.stack(images[:count]).astype(np.float32)


def _check_class_names(class_names: list[str]) -> None:
    if not class_names:
        raise ValueError(f"class_names {class_names!r} is empty; pass the class names in label-id order")


def export_saved_model(
    *, model: keras.Model, class_names: list[str], image_size: int, export_dir: str, top_k: int = DEFAULT_TOP_K
) -> None:
    """Writes a SavedModel with the `serving_default` (encoded bytes) and `serving_images` (uint8) signatures.

    Args:
        model: the trained classifier (float RGB [0, 255] images in, probabilities out).
        class_names: class names in label-id order.
        image_size: the model's input height and width.
        export_dir: destination folder (local or gs://).
        top_k: how many best classes the `top_k_*` outputs list (at most the number of classes).
    """
    _check_class_names(class_names)
    if top_k < 1:
        raise ValueError(f"top_k {top_k!r} must be at least 1; pass e.g. top_k={DEFAULT_TOP_K}")
    names = tf.constant(class_names)
    k = min(top_k, len(class_names))

    def label(images):
        probabilities = model(images, training=False)
        class_ids = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        top_k_probabilities, top_k_class_ids = tf.math.top_k(probabilities, k=k)
        return {
            "class_ids": class_ids,
            "class_names": tf.gather(names, class_ids),
            "probabilities": probabilities,
            "top_k_class_ids": top_k_class_ids,
            "top_k_class_names": tf.gather(names, top_k_class_ids),
            "top_k_probabilities": top_k_probabilities,
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(image_bytes):
        # One image at a time: files in a batch may have different sizes and formats.
        images = tf.map_fn(
            lambda encoded: data.decode_and_resize(encoded, image_size),
            image_bytes,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        )
        return label(images)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_images(images):
        return label(crop_and_resize(images, image_size))

    # tf.saved_model.save of a module holding the functions and the model's TensorFlow variables, rather than
    # keras.export.ExportArchive: with Keras 3.15 the archive stores every weight twice (the keras.Variable wrappers
    # it tracks and the tf.Variables the functions capture; keras-team/keras#23553), doubling the file and the
    # memory of every server that loads it. Here each weight is stored once (tests/test_export.py counts them).
    # The functions are saved as signatures only: attached to the module as well, tf.saved_model.save traced each
    # of them (and so the whole model) a second time (4.5 s against 2.2 s of saving, for a MobileNetV2 at 64 px).
    module = tf.Module()
    module.model_variables = [variable.value for variable in model.variables]
    tf.saved_model.save(module, export_dir, signatures={
        BYTES_SIGNATURE: serve_bytes.get_concrete_function(), IMAGES_SIGNATURE: serve_images.get_concrete_function(),
    })


def load_serving_function(export_dir: str, signature: str = BYTES_SIGNATURE):
    """Loads one signature of an exported SavedModel (a callable taking keyword tensors, returning a dict).

    Args:
        export_dir: folder written by `export_saved_model` (local or gs://).
        signature: `serving_default` (encoded `image_bytes`) or `serving_images` (uint8 `images`).
    """
    if not tf.io.gfile.exists(tf.io.gfile.join(export_dir, "saved_model.pb")):
        raise ValueError(f"no SavedModel in {export_dir!r}; train first: python -m trainer.train ...")
    signatures = tf.saved_model.load(export_dir).signatures
    if signature not in signatures:
        raise ValueError(
            f"SavedModel {export_dir!r} has no signature {signature!r}; it has {sorted(signatures)}. "
            "Re-export it with this version of trainer.exports.export, or pick one of those."
        )
    return signatures[signature]


def read_saved_model_class_names(export_dir: str) -> list[str] | None:
    """The class names a SavedModel of export_saved_model names its classes with, all of them in label-id order,
    read from saved_model.pb without loading the model (so also when only another export is run).

    The signatures gather each name from one constant, the list of every class name (its `top_k_class_names` output
    lists only the k best): that constant is the only string vector the SavedModel saves. Returns None when there is
    no SavedModel, or not exactly one such constant (not a SavedModel of export_saved_model).
    """
    from tensorflow.core.protobuf import saved_model_pb2  # the SavedModel file format (a protocol buffer)

    path = tf.io.gfile.join(export_dir, "saved_model.pb")
    if not tf.io.gfile.exists(path):
        return None
    saved_model = saved_model_pb2.SavedModel()
    with tf.io.gfile.GFile(path, "rb") as file:
        saved_model.ParseFromString(file.read())
    found = []
    for meta_graph in saved_model.meta_graphs:
        nodes = {node.name: node for node in meta_graph.graph_def.node}
        for saved_object in meta_graph.object_graph_def.nodes:
            node = nodes.get(saved_object.constant.operation) if saved_object.HasField("constant") else None
            tensor = node.attr["value"].tensor if node is not None and node.op == "Const" else None
            if tensor is not None and tensor.dtype == tf.string.as_datatype_enum and len(tensor.tensor_shape.dim) == 1:
                found.append([name.decode("utf-8") for name in tensor.string_val])
    return found[0] if len(found) == 1 else None


def export_tflite(
    *, model: keras.Model, class_names: list[str], image_size: int, output_dir: str, quantization: str,
    calibration_images: np.ndarray | None = None,
) -> str:
    """Converts the model to TFLite and writes it with `labels.txt` into `output_dir`.

    Conversion goes Keras -> SavedModel (a `keras.export.ExportArchive` with a fixed [1, size, size, 3]
    input) -> `tf.lite.TFLiteConverter.from_saved_model`, the path TensorFlow supports for Keras 3 models.
    Only built-in TFLite ops are allowed, so the file runs on any TFLite / LiteRT runtime; a mixed-precision
    model is converted from its float32 copy (classifier.float32_copy).

    Args:
        model: the trained classifier (float RGB [0, 255] images in, probabilities out).
        class_names: class names in label-id order, written one per line to `labels.txt`.
        image_size: the model's input height and width.
        output_dir: destination folder (local or gs://).
        quantization: a kind of TFLITE_FILES: "float" (float32 weights), "dynamic_range" (int8 weights, float
            activations) or "int8" (full integer, uint8 input and output; integer-only built-in ops).
        calibration_images: for "int8": float32 [n, size, size, 3] pixels in [0, 255] of the train split
            (read_calibration_images), run through the float model to choose every activation's int8 range.

    Returns:
        The path of the written `.tflite` file (see TFLITE_FILES).
    """
    if quantization not in TFLITE_FILES:
        raise ValueError(f"quantization {quantization!r} is not one of {list(TFLITE_FILES)}")
    if quantization == "int8" and (calibration_images is None or not len(calibration_images)):
        raise ValueError("the int8 TFLite file needs calibration_images: train pixels, e.g. read_calibration_images")
    _check_class_names(class_names)
    model = classifier.float32_copy(model)

    @tf.function(input_signature=[tf.TensorSpec([1, image_size, image_size, 3], tf.float32, name="images")])
    def classify(images):
        return {"probabilities": model(images, training=False)}

    # The converter reads a SavedModel from local disk; only the finished files go to output_dir (maybe gs://).
    with tempfile.TemporaryDirectory() as saved_model_dir:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(name=BYTES_SIGNATURE, fn=classify)
        archive.write_out(saved_model_dir, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=[BYTES_SIGNATURE])
        if quantization != "float":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "int8":
            converter.representative_dataset = lambda: ([image[np.newaxis]] for image in calibration_images)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.uint8
            converter.inference_output_type = tf.uint8
        tflite_model = converter.convert()

    tf.io.gfile.makedirs(output_dir)
    tflite_path = tf.io.gfile.join(output_dir, TFLITE_FILES[quantization])
    with tf.io.gfile.GFile(tflite_path, "wb") as file:
        file.write(tflite_model)
    schema.write_labels(output_dir, class_names)
    return tflite_path


def load_tflite_interpreter(tflite_path: str, num_threads: int | None = None):
    """Loads a `.tflite` file (local or gs://) into an interpreter with its tensors allocated.

    Uses LiteRT (`pip install ai-edge-litert`) when installed, else TensorFlow's own `tf.lite.Interpreter`
    (deprecated in favour of LiteRT, but still shipped with TensorFlow 2.21).

    num_threads: the interpreter's CPU threads; None = the runtime's default.
    """
    if not tf.io.gfile.exists(tflite_path):
        raise ValueError(f"no TFLite model at {tflite_path!r}; train with --export_tflite=<kinds> to write it "
                         f"({', '.join(f'{kind}: {name}' for kind, name in TFLITE_FILES.items())})")
    with tf.io.gfile.GFile(tflite_path, "rb") as file:
        tflite_model = file.read()
    return lite_pass.make_interpreter(tflite_model, num_threads=num_threads)


def predict_tflite(*, interpreter, images: np.ndarray) -> np.ndarray:
    """Runs a model from `export_tflite` on float32 [batch, size, size, 3] pixels; returns [batch, classes]."""
    (input_details,) = interpreter.get_input_details()
    (output_details,) = interpreter.get_output_details()
    height, width, channels = (int(size) for size in input_details["shape"][1:])
    if images.ndim != 4 or images.shape[1:] != (height, width, channels):
        raise ValueError(
            f"images of shape {images.shape} do not fit the TFLite input [batch, {height}, {width}, {channels}]; "
            "crop and resize them first (trainer.input.data.decode_and_resize or trainer.exports.export.crop_and_resize)"
        )
    probabilities = []
    # The exported model takes one image per call (batch 1 is what mobile runtimes optimize for).
    for image in images.astype(np.float32):
        interpreter.set_tensor(input_details["index"], quantize(image[np.newaxis], input_details))
        interpreter.invoke()
        probabilities.append(dequantize(interpreter.get_tensor(output_details["index"])[0], output_details))
    return np.stack(probabilities)


def quantize(values: np.ndarray, details: dict) -> np.ndarray:
    """Float values as a TFLite input tensor takes them: unchanged for a float input, else
    round(value / scale + zero_point) clipped to its integer type (details: from get_input_details)."""
    if details["dtype"] == np.float32:
        return values.astype(np.float32)
    scale, zero_point = details["quantization"]
    limits = np.iinfo(details["dtype"])
    return np.clip(np.round(values / scale + zero_point), limits.min, limits.max).astype(details["dtype"])


def dequantize(values: np.ndarray, details: dict) -> np.ndarray:
    """A TFLite output tensor as float32: (value - zero_point) * scale for an integer output."""
    if details["dtype"] == np.float32:
        return values
    scale, zero_point = details["quantization"]
    return (values.astype(np.float32) - zero_point) * scale
