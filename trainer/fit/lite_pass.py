"""The frozen pass through LiteRT (float32, XNNPACK kernels) on hosts without an accelerator: --frozen_pass_engine.

Phase 1's pass (which also emits phase 2's cut activations, activations.py) and the data-quality report's test
pass run the frozen backbone in inference mode over every image and view. On a CPU, Keras (TensorFlow's kernels)
computes that network at a fraction of what the cores can do; the same network converted to a float32 .tflite
and run by LiteRT's XNNPACK kernels is faster (benchmarks/frozen_pass.py), but converting takes seconds. So the
pass model is cut in two at the backbone's input,

    pass model = front  (images -> [augmentation] -> preprocess: Keras, so random layers act as in training)
                 + frozen (preprocessed pixels -> backbone [-> cut activations] -> pooled features: LiteRT),

the frozen part is converted once per run (from its traced function, weights frozen into constants: nothing is
written to disk; kept in memory), checked against Keras on CHECK_IMAGES random images (its outputs must agree to
TOLERANCE of their scale, else the run goes on with Keras and says why), and then runs every batch of the pass.
plan() decides which engine runs: auto picks LiteRT on a CPU host when the pass has enough views to repay the
conversion (MIN_VIEWS, measured in docs/training.md); keras and litert force either (litert still falls back to
Keras, with a warning, where it cannot run or does not agree). Phase 2's own pass (a resumed run whose phase 1 was
done) runs in Keras.
"""

import dataclasses
import time
import weakref

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer.fit import activations as activations_lib
from trainer.fit import features as features_lib
from trainer.input import data
from trainer.models import classifier

MODES = ("auto", "keras", "litert")
# auto converts only for a pass of at least this many images and views at 224 px (more at smaller sizes: a view
# saves time in proportion to its pixels): converting EfficientNet-Lite0 and checking it took 1.5 +- 0.2 s, and
# LiteRT saved about 5.4 ms per 224 px view of phase 1's pass in the trainer on a 2-core CPU (flowers_small, 3 runs
# per engine, docs/training.md): it repays itself from about 300.
MIN_VIEWS = 400
REFERENCE_SIZE = 224
# Largest difference of LiteRT's outputs from Keras's, relative to the largest Keras output, accepted.
TOLERANCE = 1e-4
# Random images of the check. Few: Keras runs them eagerly, and an eager pass of 32 images at 224 px kept 2.4 GB.
CHECK_IMAGES = 4

_CONVERTED = weakref.WeakKeyDictionary()
_FALLBACKS = weakref.WeakKeyDictionary()  # Keras pass model -> why LiteRT, chosen, did not run it


@dataclasses.dataclass(frozen=True)
class Decision:
    """plan()'s answer: the engine ("keras" or "litert") and why, in one line for the log."""

    engine: str
    reason: str


def plan(mode: str, *, model: keras.Model, strategy: tf.distribute.Strategy, views: int, image_size: int) -> Decision:
    """Decides which engine runs the frozen pass.

    Args:
        mode: --frozen_pass_engine: "auto", "keras" or "litert".
        views: images and views the pass will run over (training views, validation and report images).
        image_size: their height and width.
    """
    if mode not in MODES:
        raise ValueError(f"--frozen_pass_engine {mode!r} is not one of {MODES}")
    if mode == "keras":
        return Decision("keras", "--frozen_pass_engine=keras")
    refusal = _refusal(model, strategy)
    if refusal:
        return Decision("keras", refusal if mode == "auto" else f"--frozen_pass_engine=litert cannot run: {refusal}")
    if mode == "litert":
        return Decision("litert", "--frozen_pass_engine=litert")
    needed = int(MIN_VIEWS * (REFERENCE_SIZE / image_size) ** 2)
    if views < needed:
        return Decision("keras", f"{views} images and views at {image_size} px: converting to LiteRT repays itself "
                                 f"from about {needed}")
    return Decision("litert", f"{views} images and views at {image_size} px on a CPU host")


def _refusal(model: keras.Model, strategy: tf.distribute.Strategy) -> str:
    """Why LiteRT cannot run this model's frozen pass here, or ""."""
    if data.has_accelerator(strategy):
        return "an accelerator runs the pass"
    if keras.mixed_precision.global_policy().name != "float32":
        return f"the {keras.mixed_precision.global_policy().name} policy (LiteRT's pass is float32)"
    if len(classifier.get_backbones(model)) != 1:
        return "not a single-backbone classifier (an ensemble or the baseline CNN)"
    return ""


class LitePass:
    """A pass model whose frozen part runs in LiteRT: what features.compute_features takes as its feature model.

    front: the Keras part before the backbone (traced and run by compute_features). run(pixels): the frozen part's
    outputs (pooled features first), as numpy arrays, for a batch of the front's output of any size (padded to, or
    cut in, the converted batch). output_indices: the interpreter's output tensors in the frozen model's order.
    """

    def __init__(self, *, front: keras.Model, interpreter, batch_size: int, output_indices: list, seconds: float,
                 difference: float | None):
        self.front = front
        self.batch_size = batch_size
        self.seconds = seconds
        self.difference = difference
        self.counted = False  # conversion_seconds handed the conversion's time to the run's time table
        self._interpreter = interpreter
        self._input_index = interpreter.get_input_details()[0]["index"]
        self._output_indices = output_indices

    def run(self, pixels: np.ndarray) -> list:
        results = []
        for start in range(0, len(pixels), self.batch_size):
            chunk = np.asarray(pixels[start:start + self.batch_size], np.float32)
            padding = np.zeros((self.batch_size - len(chunk), *chunk.shape[1:]), np.float32)
            self._interpreter.set_tensor(self._input_index, np.concatenate([chunk, padding]) if len(padding) else chunk)
            self._interpreter.invoke()
            # get_tensor copies: the next invoke overwrites the interpreter's buffers.
            results.append([self._interpreter.get_tensor(index)[:len(chunk)] for index in self._output_indices])
        return [np.concatenate(parts) for parts in zip(*results)]


def pass_model(model: keras.Model, *, cut: activations_lib.Cut | None, decision: Decision, batch_size: int):
    """The pass model for phase 1's pass: a LitePass when the decision is LiteRT and the conversion agrees with
    Keras, else the Keras model (activations.split_at_cut's pass_model with a cut, else features.split_model's
    feature model). Converted once per model, cut and batch size."""
    if cut is not None:
        cut_models = activations_lib.split_at_cut(model, cut)
        keras_model = cut_models.pass_model
    else:
        keras_model = features_lib.split_model(model)[0]
    if decision.engine != "litert":
        return keras_model
    front, frozen = (cut_models.front, cut_models.frozen) if cut is not None else activations_lib.split_front(model)
    converted = _CONVERTED.setdefault(model, {})
    key = (cut.layer if cut else None, batch_size)
    if key not in converted:
        converted[key] = _convert_or_explain(front, frozen, batch_size=batch_size)
    if isinstance(converted[key], str):
        _FALLBACKS[keras_model] = converted[key]
        return keras_model
    return converted[key]


def conversion_seconds(feature_model) -> float:
    """Seconds the LiteRT conversion (and its check) of this pass took: 0 for a Keras model or a pass converted
    before (its time was counted then)."""
    if not isinstance(feature_model, LitePass) or feature_model.counted:
        return 0.0
    feature_model.counted = True
    return feature_model.seconds


def describe(feature_model, decision: Decision) -> dict:
    """What metrics.json says about the engine that ran a pass."""
    if isinstance(feature_model, LitePass):
        return {"engine": "litert", "reason": decision.reason, "conversion_seconds": round(feature_model.seconds, 1),
                "largest_difference": float(f"{feature_model.difference:.2e}"), "threads": data.usable_cores()}
    fallback = _FALLBACKS.get(feature_model) if feature_model is not None else None
    return {"engine": "keras", "reason": f"{decision.reason}; LiteRT not used: {fallback}" if fallback
            else decision.reason}


def _convert_or_explain(front: keras.Model, frozen: keras.Model, *, batch_size: int) -> "LitePass | str":
    """Converts and checks the frozen part; where it fails or disagrees with Keras, the reason (also warned)."""
    try:
        lite = convert(front, frozen, batch_size=batch_size)
    except Exception as error:  # the converter's errors are many and long: one line, then Keras
        reason = "conversion failed: " + (str(error).strip().splitlines()[0] if str(error).strip()
                                          else type(error).__name__)
    else:
        if lite.difference is None:
            reason = "could not be checked: Keras's outputs on random images are all zero"
        elif lite.difference <= TOLERANCE:
            logging.info("frozen pass: LiteRT float32 (XNNPACK, %d threads), converted in %.1fs; agrees with Keras "
                         "to %.1e of the outputs' scale", data.usable_cores(), lite.seconds, lite.difference)
            return lite
        else:
            reason = (f"its outputs differ from Keras's by {lite.difference:.1e} of their scale "
                      f"(more than {TOLERANCE:.0e})")
    logging.warning("frozen pass: LiteRT %s; the pass runs in Keras", reason)
    return reason


def convert(front: keras.Model, frozen: keras.Model, *, batch_size: int) -> LitePass:
    """Converts `frozen` to a float32 LiteRT model of a fixed batch and checks it on CHECK_IMAGES random images:
    its `difference` is the largest of LiteRT's outputs' differences from Keras's relative to their scale, None
    when Keras's outputs are all zero (nothing to compare).

    From the traced function alone: without a trackable object the converter freezes the weights into constants
    (given one, it lowers the function through a SavedModel it writes to the system's temporary folder, and took
    6-7 s for EfficientNet-Lite0 where this takes about 1 s; the exports, which keep their SavedModel, go that way).
    `frozen` stays referenced by the caller while this runs.
    """
    started = time.perf_counter()
    spec = tf.TensorSpec([batch_size, *frozen.input.shape[1:]], tf.float32)

    @tf.function(input_signature=[spec])
    def serve(pixels):
        return tf.nest.flatten(frozen(pixels, training=False))

    concrete = serve.get_concrete_function()
    # The converter warns (through absl's logger) that this path, without a trackable object, is deprecated: it is
    # the one that freezes the weights, and the check below catches a conversion gone wrong, so the warning is kept
    # out of the run's log.
    def not_the_deprecation_notice(record):
        return "trackable_obj argument" not in record.getMessage()

    loggers = (logging.get_absl_logger(), tf.get_logger())
    for logger in loggers:
        logger.addFilter(not_the_deprecation_notice)
    try:
        converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
        converter.experimental_lower_to_saved_model = False  # said outright: without a trackable object it is not tried
        tflite = converter.convert()
    finally:
        for logger in loggers:
            logger.removeFilter(not_the_deprecation_notice)
    interpreter = make_interpreter(tflite, num_threads=data.usable_cores())
    # The interpreter's outputs carry the names of the function's output tensors ("Identity", "Identity_1", ...).
    index_of = {detail["name"]: detail["index"] for detail in interpreter.get_output_details()}
    names = [tensor.name.split(":")[0] for tensor in concrete.outputs]
    if sorted(names) != sorted(index_of):
        raise ValueError(f"the converted model's outputs {sorted(index_of)} are not the function's {names}")
    lite = LitePass(front=front, interpreter=interpreter, batch_size=batch_size,
                    output_indices=[index_of[name] for name in names], seconds=0.0, difference=float("nan"))
    images = np.random.default_rng(0).uniform(0, 255, (CHECK_IMAGES, *front.input.shape[1:])).astype(np.float32)
    pixels = np.asarray(front(images, training=False), np.float32)
    expected = [np.asarray(output) for output in tf.nest.flatten(frozen(pixels, training=False))]
    scales = [float(np.abs(want).max()) for want in expected]
    lite.difference = None if min(scales) == 0 else max(
        float(np.abs(got - want).max()) / scale for got, want, scale in zip(lite.run(pixels), expected, scales))
    lite.seconds = time.perf_counter() - started
    return lite


def make_interpreter(tflite_model: bytes, num_threads: int | None = None):
    """An interpreter of a .tflite model's bytes with its tensors allocated: LiteRT's (`pip install ai-edge-litert`)
    when installed, else TensorFlow's own tf.lite.Interpreter (deprecated in favour of LiteRT, still shipped)."""
    try:
        from ai_edge_litert import interpreter as litert

        interpreter_class = litert.Interpreter
    except ImportError:
        interpreter_class = tf.lite.Interpreter
    interpreter = interpreter_class(model_content=tflite_model, num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter
