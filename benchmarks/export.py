"""Latency (batch 1) and throughput (batch 32) of every export of a trained run, on this CPU, with file sizes.

    python -m trainer.train --data_dir=... --model_dir=/tmp/flowers_model --export_tflite=float,dynamic_range,int8 \
        --export_onnx
    python -m benchmarks.export --model_dir=/tmp/flowers_model

Measures what is in --model_dir: the SavedModel (its `serving_images` signature, fed uint8 images already at the
model's size, so its crop and resize are nearly free), each TFLite file (the TFLite interpreter with
--num_threads; batch 32 by resizing its input tensor) and model.onnx (onnxruntime on the CPU). Every
measurement repeats (--repeats timed calls after 3 untimed ones, in interleaved rounds so a slow spell of this
shared machine hits every export alike) and the table gives the median with the range of the rounds' medians;
"vs SavedModel" is the ratio to the SavedModel measured in the same run. When the run's evaluation.json holds
the exports' evaluation (trainer/reports/export_accuracy.py), their accuracy and agreement with the SavedModel are joined
in. Inputs are random pixels: speed does not depend on them.
"""

import json
import os
import statistics
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from trainer.exports import export
from trainer.reports import evaluation
from trainer.reports import export_accuracy

FLAGS = flags.FLAGS
WARMUP_CALLS = 3


def make_runners(model_dir: str, image_size: int, num_threads: int) -> dict:
    """format -> {batch size: a callable running one batch}, for every export in model_dir."""
    runners = {}
    for name, path in export_accuracy.export_files(model_dir):
        if name == "saved_model":
            serve = export.load_serving_function(path, export.IMAGES_SIGNATURE)
            runners[name] = {size: _saved_model_call(serve, size, image_size) for size in (1, 32)}
        elif name == "onnx":
            from trainer.exports import onnx_model

            session = onnx_model.load_onnx_session(path)
            runners[name] = {size: _onnx_call(session, size, image_size) for size in (1, 32)}
        else:
            runners[name] = {size: _tflite_call(path, size, num_threads) for size in (1, 32)}
    return runners


def _saved_model_call(serve, batch_size: int, image_size: int):
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8))
    return lambda: serve(images=images)["probabilities"].numpy()


def _onnx_call(session, batch_size: int, image_size: int):
    images = np.random.default_rng(0).uniform(0, 255, (batch_size, image_size, image_size, 3)).astype(np.float32)
    input_name = session.get_inputs()[0].name
    return lambda: session.run(None, {input_name: images})


def _tflite_call(path: str, batch_size: int, num_threads: int):
    interpreter = export.load_tflite_interpreter(path, num_threads=num_threads)
    (details,) = interpreter.get_input_details()
    shape = [batch_size, *details["shape"][1:]]
    interpreter.resize_tensor_input(details["index"], shape)
    interpreter.allocate_tensors()
    pixels = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
    interpreter.set_tensor(details["index"], export.quantize(pixels, details))

    def call():
        interpreter.invoke()

    return call


def measure(runners: dict, repeats: int, rounds: int) -> dict:
    """format -> batch size -> per-round median seconds of one call."""
    for calls in runners.values():
        for call in calls.values():
            for _ in range(WARMUP_CALLS):
                call()
    seconds = {name: {size: [] for size in calls} for name, calls in runners.items()}
    for _ in range(rounds):
        for name, calls in runners.items():
            for size, call in calls.items():
                times = []
                for _ in range(repeats if size == 1 else max(2, repeats // 8)):
                    start = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - start)
                seconds[name][size].append(statistics.median(times))
    return seconds


def format_table(seconds: dict, model_dir: str) -> str:
    sizes = {name: export_accuracy.file_size(path) for name, path in export_accuracy.export_files(model_dir)}
    evaluated = {}
    report_path = os.path.join(model_dir, evaluation.EVALUATION_JSON)
    if tf.io.gfile.exists(report_path):
        with tf.io.gfile.GFile(report_path) as file:
            evaluated = {row["format"]: row for row in json.load(file).get("exports", [])}
    reference_latency = statistics.median(seconds["saved_model"][1])
    reference_throughput = 32 / statistics.median(seconds["saved_model"][32])
    header = (f"{'format':<22}{'size MB':>9}{'batch 1 ms':>12}{'(range)':>15}{'vs SM':>7}{'batch 32 img/s':>16}"
              f"{'(range)':>15}{'vs SM':>7}{'accuracy':>10}{'agrees':>8}")
    lines = [header]
    for name, by_size in seconds.items():
        latency = [value * 1000 for value in by_size[1]]
        throughput = [32 / value for value in by_size[32]]
        row = evaluated.get(name)
        lines.append(
            f"{name:<22}{sizes[name] / 1e6:>9.2f}{statistics.median(latency):>12.1f}"
            f"{f'{min(latency):.1f}-{max(latency):.1f}':>15}{reference_latency * 1000 / statistics.median(latency):>6.2f}x"
            f"{statistics.median(throughput):>16.1f}{f'{min(throughput):.0f}-{max(throughput):.0f}':>15}"
            f"{statistics.median(throughput) / reference_throughput:>6.2f}x"
            + (f"{row['accuracy']:>10.4f}{row['agreement_with_saved_model']:>8.4f}" if row else f"{'n/a':>10}{'n/a':>8}")
        )
    return "\n".join(lines)


def main(argv):
    del argv
    if not FLAGS.model_dir or not tf.io.gfile.exists(os.path.join(FLAGS.model_dir, export.SAVED_MODEL_DIR)):
        raise app.UsageError(f"--model_dir={FLAGS.model_dir!r} has no saved_model/: give a finished training run")
    image_size = evaluation.model_image_size(evaluation.load_model(FLAGS.model_dir))
    runners = make_runners(FLAGS.model_dir, image_size, FLAGS.num_threads)
    seconds = measure(runners, repeats=FLAGS.repeats, rounds=FLAGS.rounds)
    print(f"model: {FLAGS.model_dir} ({image_size} px); cores: {os.cpu_count()}; TFLite threads: {FLAGS.num_threads}; "
          f"{FLAGS.rounds} rounds of {FLAGS.repeats} calls at batch 1 and {max(2, FLAGS.repeats // 8)} at batch 32; "
          "median over rounds (range of the rounds' medians); vs SM: speed relative to the SavedModel")
    print(format_table(seconds, FLAGS.model_dir))


if __name__ == "__main__":
    flags.DEFINE_string("model_dir", None, "A finished training run with its exports (--export_tflite, --export_onnx).")
    flags.DEFINE_integer("repeats", 40, "Timed calls per round at batch 1 (an eighth of them, at least 2, at batch 32).")
    flags.DEFINE_integer("rounds", 3, "Interleaved rounds over all exports.")
    flags.DEFINE_integer("num_threads", os.cpu_count() or 1, "TFLite interpreter threads.")
    app.run(main)
