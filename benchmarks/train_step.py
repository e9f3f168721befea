"""End-to-end fit() throughput fed by our pipeline vs in-memory tensors: the input overhead.

    python -m benchmarks.train_step --image_dir=../shared/data/flowers_small

MobileNetV2 (weights=None), --image_size, --batch_size, Keras `model.fit` on trainer.models.classifier.build_model:
phase 1 (frozen backbone) and phase 2 (trainer.models.classifier.unfreeze_backbone, recompiled). Each phase is fed
by trainer.input.data.make_dataset (default policy, and flip + rotation on the host or on the device) and by one
synthetic in-memory batch repeated. "vs synthetic" = fed images/s / synthetic images/s: the input
overhead (1.0 = none; target for phase 1: >= 0.95).
Each phase times its feeds in --rounds interleaved rounds: every round fits each feed's model for one
untimed epoch (a fresh iterator warming up; the first round also traces) and one timed epoch, so a slow
spell of this shared machine hits every feed alike. The median over the rounds is reported.
"""

import os
import statistics
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from benchmarks import common
from tfrecords import schema
from trainer.input import data
from trainer.models import classifier

FLAGS = flags.FLAGS


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def build(num_classes: int, augmentation=None) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = classifier.build_model(
        classifier.ModelSpec(
            backbone="mobilenet_v2", image_size=FLAGS.image_size, weights="none", preprocess="tf", dropout=0.2,
        ),
        num_classes=num_classes, augmentation=augmentation,
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    return model


def fit_rate(model: keras.Model, dataset: tf.data.Dataset, steps: int) -> float:
    """Images/s of one timed epoch of `steps`, after one untimed epoch (fit starts a fresh iterator)."""
    timer = EpochTimer()
    model.fit(dataset, epochs=2, steps_per_epoch=steps, shuffle=False, verbose=0, callbacks=[timer])
    return steps * FLAGS.batch_size / timer.seconds[1]


def to_phase_2(model: keras.Model) -> None:
    classifier.unfreeze_backbone(model, "0.7")
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")


def main(argv):
    del argv
    size, batch = FLAGS.image_size, FLAGS.batch_size
    data_dir = common.convert(
        FLAGS.image_dir, FLAGS.converted_dir or os.path.join(FLAGS.work_dir, f"max_side_{FLAGS.max_side}"),
        max_side=FLAGS.max_side,
    )
    manifest = schema.read_manifest(data_dir)
    num_classes = len(manifest["classes"])
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32))
    labels = tf.constant(rng.integers(0, num_classes, batch).astype(np.int32))
    synthetic = tf.data.Dataset.from_tensors((images, labels)).repeat()

    def ours(augmentation, flip=True):
        return data.make_dataset(
            data_dir=data_dir, manifest=manifest, split="train", image_size=size, batch_size=batch,
            training=True, augmentation=augmentation, options=data.PipelineOptions(flip=flip),
        )

    feeds = {
        "synthetic in-memory tensors": lambda: (synthetic, None),
        "ours, default policy (crop + flip on host)": lambda: (ours(None), None),
        "ours, default policy, on TF's shared inter-op pool": lambda: (common.on_shared_pool(ours(None)), None),
        "ours, crop + flip + rotation(0.2) on host": lambda: (
            ours(data.make_augmentation(flip=False, rotation=0.2, pixels="uint8")), None),
        "ours, crop on host, flip + rotation(0.2) on device": lambda: (
            ours(None, flip=False), data.make_augmentation(flip=True, rotation=0.2)),
    }
    print(f"\nMobileNetV2 weights=None image_size={size} batch_size={batch} data={data_dir} cores={os.cpu_count()}")
    print(f"{'phase':<8} {'fed by':<52} {'images/s':>9} {'vs synthetic':>13}")
    for phase, steps in (("phase 1", FLAGS.phase_1_steps), ("phase 2", FLAGS.phase_2_steps)):
        runs = {}
        for name, make_feed in feeds.items():
            dataset, device_augmentation = make_feed()
            model = build(num_classes, device_augmentation)
            if phase == "phase 2":
                to_phase_2(model)
            runs[name] = (model, dataset)
        rates = {name: [] for name in runs}
        for _ in range(FLAGS.rounds):
            for name, (model, dataset) in runs.items():
                rates[name].append(fit_rate(model, dataset, steps))
        ceiling = statistics.median(rates["synthetic in-memory tensors"])
        for name, values in rates.items():
            rate = statistics.median(values)
            print(f"{phase:<8} {name:<52} {rate:>9.0f} {rate / ceiling:>12.2f}x", flush=True)


if __name__ == "__main__":
    flags.DEFINE_string("image_dir", common.DEFAULT_IMAGE_DIR, "Folder of class subfolders of JPEGs.")
    flags.DEFINE_string("work_dir", "/tmp/pipeline_benchmark", "Where the converted copy is written (once).")
    flags.DEFINE_string("converted_dir", "", "Use this converted copy of --image_dir instead of converting.")
    flags.DEFINE_integer("max_side", 256, "Longest image side of the converted copy (0: as is).")
    flags.DEFINE_integer("image_size", 160, "Input height and width.")
    flags.DEFINE_integer("batch_size", 32, "Images per batch.")
    flags.DEFINE_integer("phase_1_steps", 40, "Timed steps of phase 1 (after as many warm-up steps).")
    flags.DEFINE_integer("phase_2_steps", 20, "Timed steps of phase 2 (after as many warm-up steps).")
    flags.DEFINE_integer("rounds", 3, "Interleaved rounds (one timed epoch per row each); the median is reported.")
    app.run(main)
