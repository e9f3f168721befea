"""The frozen backbone's forward pass: Keras (TensorFlow) against LiteRT float32 (XNNPACK) on this machine.

    python -m benchmarks.frozen_pass --backbone_file=../shared/models/efficientnet_lite0_imagenet_notop.keras

The pass phase 1 makes over every image and view (and the data-quality report over every image): preprocess ->
backbone -> pooled features, batch --batch_size at --image_size. Keras runs it as the trainer does (a tf.function
of the model, training=False); LiteRT runs the same model converted to a float32 .tflite with a [batch, size, size,
3] input, on --threads threads. Both engines see the same real photos (--image_dir); the table shows images/s
(median of --rounds interleaved rounds), the ratio LiteRT / Keras, and the largest difference of their features
(float tolerance: they must agree to ~1e-4 of the features' scale before LiteRT could replace Keras there).

    python -m benchmarks.frozen_pass --image_dirs=../shared/data/flowers_small,../shared/data/flowers_1500

With --image_dirs, the pass is measured where it runs, in the trainer: each folder is converted once (default
splits), then `python -m trainer.train` with our defaults but --epochs=1 --fine_tune_epochs=1 runs --rounds times
per engine (--frozen_pass_engine=keras and litert, alternating which goes first). From each run's metrics.json:
phase 1's pass (caching + conversion, in the run's time table), its images/s, the data-quality report and the
run's total. Decoding and augmentation share the cores with the pass there, as in every real run.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags
from PIL import Image

from benchmarks import common
from trainer.fit import features
from trainer.models import classifier

FLAGS = flags.FLAGS
flags.DEFINE_string("backbone_file", os.path.join(os.path.dirname(common.REPO_ROOT), "shared", "models",
                                                  "efficientnet_lite0_imagenet_notop.keras"), "The backbone.")
flags.DEFINE_string("image_dir", common.DEFAULT_IMAGE_DIR, "Real photos to feed both engines.")
flags.DEFINE_integer("image_size", 224, "Input height and width.")
flags.DEFINE_integer("batch_size", 32, "Images per call.")
flags.DEFINE_integer("batches", 4, "Timed batches per round and engine.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
flags.DEFINE_integer("threads", 0, "LiteRT threads; 0 = the machine's cores.")
flags.DEFINE_string("image_dirs", "", "Comma-separated class folders: measure the pass inside trainer.train instead.")
flags.DEFINE_string("work_dir", "/tmp/frozen_pass_benchmark", "With --image_dirs: shards and runs.")


def photos(count: int, size: int) -> np.ndarray:
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(FLAGS.image_dir) for name in names
                   if name.lower().endswith(common.IMAGE_EXTENSIONS))[:count]
    return np.stack([np.asarray(Image.open(path).convert("RGB").resize((size, size)), np.float32) for path in paths])


def in_the_trainer() -> None:
    """--image_dirs: phase 1's pass inside trainer.train, both engines, --rounds runs each per folder."""
    for image_dir in FLAGS.image_dirs.split(","):
        name = os.path.basename(os.path.normpath(image_dir))
        data_dir = os.path.join(FLAGS.work_dir, name, "tfrecords")
        if not os.path.exists(os.path.join(data_dir, "manifest.json")):
            subprocess.run([sys.executable, "-m", "tfrecords.build", f"--input_dir={image_dir}",
                            f"--output_dir={data_dir}", "--overwrite"], cwd=common.REPO_ROOT, check=True,
                           capture_output=True)
        runs = {"keras": [], "litert": []}
        for round_index in range(FLAGS.rounds):
            for engine in (("keras", "litert") if round_index % 2 == 0 else ("litert", "keras")):
                model_dir = os.path.join(FLAGS.work_dir, name, f"{engine}_{round_index}")
                shutil.rmtree(model_dir, ignore_errors=True)
                subprocess.run([sys.executable, "-m", "trainer.train", f"--data_dir={data_dir}",
                                f"--model_dir={model_dir}", f"--backbone={FLAGS.backbone_file}", "--preprocess=tf",
                                f"--image_size={FLAGS.image_size}", "--epochs=1", "--fine_tune_epochs=1",
                                f"--frozen_pass_engine={engine}"],
                               cwd=common.REPO_ROOT, check=True, capture_output=True)
                with open(os.path.join(model_dir, "metrics.json")) as file:
                    runs[engine].append(json.load(file))
        _print_runs(name, runs)


def _print_runs(name: str, runs: dict) -> None:
    """Each engine's runs, one column per stage: every run's seconds, then mean +- sd."""
    cache = runs["litert"][0]["phase2_cache"]
    print(f"\n{name}: phase 1's pass in trainer.train ({cache.get('train_rows', 0) + cache.get('validation_rows', 0)} "
          f"views with the phase-2 activations, {FLAGS.image_size} px), {FLAGS.rounds} runs per engine, seconds:")
    means = {}
    for engine, found in runs.items():
        times = [metrics["time_seconds"] for metrics in found]
        columns = {
            "conversion": [each.get("phase1: LiteRT conversion of the frozen pass", 0.0) for each in times],
            "pass": [each["phase1: caching backbone features"] for each in times],
            "data-quality report": [each["data-quality report"] for each in times],
            "run": [each["total"] for each in times],
        }
        columns["pass + conversion"] = [a + b for a, b in zip(columns["conversion"], columns["pass"])]
        means[engine] = statistics.mean(columns["pass + conversion"])
        print(f"  {engine:<7}" + "; ".join(
            f"{column} {' / '.join(f'{value:.1f}' for value in values)} ({statistics.mean(values):.1f}"
            f" +- {statistics.stdev(values) if len(values) > 1 else 0.0:.1f})" for column, values in columns.items()))
    print(f"  litert / keras, pass + conversion (means): {means['litert'] / means['keras']:.2f}x")


def main(argv):
    del argv
    if FLAGS.image_dirs:
        in_the_trainer()
        return
    from ai_edge_litert.interpreter import Interpreter  # the lite extra

    model = classifier.build_model(classifier.ModelSpec(backbone=FLAGS.backbone_file, image_size=FLAGS.image_size,
                                                       preprocess="tf"),
                                   num_classes=5)
    feature_model, _ = features.split_model(model)
    images = photos(FLAGS.batch_size, FLAGS.image_size)
    keras_pass = tf.function(lambda batch: feature_model(batch, training=False))

    @tf.function(input_signature=[tf.TensorSpec([FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 3], tf.float32)])
    def serve(batch):
        return feature_model(batch, training=False)

    # As trainer/exports/export.py converts: through a SavedModel written by keras.export.ExportArchive (converted
    # from a concrete function instead, the weights stay variables the interpreter never initialises: NaN features).
    started = time.perf_counter()
    saved_model_dir = tempfile.mkdtemp()
    archive = keras.export.ExportArchive()
    archive.track(feature_model)
    archive.add_endpoint(name="serve", fn=serve)
    archive.write_out(saved_model_dir, verbose=False)
    tflite = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=["serve"]).convert()
    conversion = time.perf_counter() - started
    path = os.path.join(saved_model_dir, "pass.tflite")
    with open(path, "wb") as file:
        file.write(tflite)
    interpreter = Interpreter(model_path=path, num_threads=FLAGS.threads or os.cpu_count())
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]

    def litert_pass(batch):
        interpreter.set_tensor(input_index, batch)
        interpreter.invoke()
        return interpreter.get_tensor(output_index)

    expected = keras_pass(images).numpy()
    difference = np.abs(litert_pass(images) - expected).max() / max(np.abs(expected).max(), 1e-12)
    rates = {"keras": [], "litert": []}
    for _ in range(FLAGS.rounds):
        for name, run in (("keras", lambda: keras_pass(images).numpy()), ("litert", lambda: litert_pass(images))):
            run()
            started = time.perf_counter()
            for _ in range(FLAGS.batches):
                run()
            rates[name].append(FLAGS.batches * FLAGS.batch_size / (time.perf_counter() - started))
    keras_rate, litert_rate = (statistics.median(rates[name]) for name in ("keras", "litert"))
    print(f"frozen pass of {os.path.basename(FLAGS.backbone_file)} at {FLAGS.image_size} px, batch {FLAGS.batch_size}, "
          f"{os.cpu_count()} cores; LiteRT conversion {conversion:.1f} s")
    print(f"{'engine':<8} {'img/s (rounds)':<30} {'median':>8} {'vs keras':>9}")
    for name, rate in (("keras", keras_rate), ("litert", litert_rate)):
        spread = " ".join(f"{value:.0f}" for value in rates[name])
        print(f"{name:<8} {spread:<30} {rate:>8.0f} {rate / keras_rate:>9.2f}")
    print(f"largest feature difference / largest feature: {difference:.2e}")


if __name__ == "__main__":
    app.run(main)
