r"""Two-phase transfer learning on the converter's shards, then evaluation and export.

    python -m trainer.train --data_dir=/tmp/flowers_tfrecords --model_dir=/tmp/flowers_model \
        --backbone=mobilenet_v2 --epochs=5 --fine_tune_epochs=5

Phase 1 trains a new head on the frozen backbone; phase 2 unfreezes the backbone from --fine_tune_at
(BatchNormalization stays in inference mode) and continues at a lower learning rate, with the epoch count
continuing so TensorBoard shows one curve per metric. Both run in trainer/loop.py, the same loop under
every strategy. Re-running the same command after an interruption resumes from the latest checkpoint in
<model_dir>/checkpoints (mid-epoch); a SIGTERM (preemption) saves one and exits with code 75.
"""

import hashlib
import json
import sys

import keras
import tensorflow as tf
from absl import app, flags, logging

from trainer import data, distribute, export, loop, model as model_lib

FLAGS = flags.FLAGS

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; launchers retry on it


def weights_fingerprint(model: keras.Model) -> str:
    """A short digest of every weight's bytes: equal on all workers when they are in sync."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(keras.ops.convert_to_numpy(weight).tobytes())
    return digest.hexdigest()[:16]


def make_optimizer(learning_rate: float, precision: str, model: keras.Model):
    """Adam for the model's trainable weights; wrapped for loss scaling under mixed_float16.

    Call inside strategy.scope(). The optimizer's variables are created here, not lazily in the first
    step: creating variables inside a replicated tf.function fails, and a checkpoint needs them to
    exist to be restored into.
    """
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer


def distribute_dataset(strategy: tf.distribute.Strategy, make_dataset):
    """Builds the dataset once per input pipeline (per worker), each reading its own files, and batching
    per replica: the same code feeds one GPU, a multi-GPU host and many hosts.

    Args:
        strategy: the tf.distribute strategy.
        make_dataset: a function of a tf.distribute.InputContext returning that pipeline's dataset.
    """
    return strategy.distribute_datasets_from_function(make_dataset)


def train_and_export(
    *,
    strategy: tf.distribute.Strategy,
    data_dir: str,
    manifest: dict,
    model_dir: str,
    backbone: str,
    weights: str,
    preprocess: str,
    image_size: int,
    batch_size: int,
    precision: str,
    epochs: int,
    fine_tune_epochs: int,
    learning_rate: float,
    fine_tune_learning_rate: float,
    fine_tune_at: str,
    dropout: float,
    steps_per_epoch: int,
    augment_on: str,
    augmentation_factors: dict,
    dataset_arguments: dict,
    early_stopping_patience: int,
    profile_steps: tuple[int, int] | None,
    checkpoint_every_steps: int,
    steps_per_execution: int,
    jit_compile: bool,
    seed: int,
) -> dict:
    """Runs both phases, evaluates, exports, and returns the metrics written to metrics.json.

    Args: as the flags of the same names; `preprocess` is already resolved, `fine_tune_learning_rate`
    already defaulted. `augmentation_factors` holds data.make_augmentation's layer factors (rotation,
    zoom, translation, contrast, brightness); `augment_on` says whether those layers run in tf.data
    ("host") or as the model's first layers ("device"). `dataset_arguments` holds the remaining keyword
    arguments of data.make_dataset (flip, crop_min_area, shuffle_buffer, cache, ...).

    Raises:
        loop.Preempted: a SIGTERM stopped training after saving a checkpoint.
    """
    class_names = manifest["classes"]
    num_train = manifest["splits"]["train"]["num_examples"]
    steps_per_epoch = steps_per_epoch or max(1, num_train // batch_size)
    eval_split = "test" if "test" in manifest["splits"] else "validation"
    chief = distribute.is_chief(strategy)
    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy(precision)

    def augmentation():
        return data.make_augmentation(flip=False, seed=seed, **augmentation_factors)  # flips happen in decode

    host_augmentation = augmentation() if augment_on == "host" else None

    def dataset(split, training):
        return distribute_dataset(strategy, lambda input_context: data.make_dataset(
            data_dir=data_dir, manifest=manifest, split=split, image_size=image_size, batch_size=batch_size,
            training=training, augmentation=host_augmentation, seed=seed, input_context=input_context,
            **dataset_arguments,
        ))

    with strategy.scope():
        model = model_lib.build_model(
            backbone=backbone, num_classes=len(class_names), image_size=image_size,
            weights=weights, preprocess=preprocess, dropout=dropout,
            augmentation=augmentation() if augment_on == "device" else None,
        )
    history = loop.History(model_dir, chief)
    preemption = loop.PreemptionWatcher()
    phase_arguments = dict(
        model=model, strategy=strategy, model_dir=model_dir, train_dataset=dataset("train", training=True),
        validation_dataset=dataset("validation", training=False), global_batch_size=batch_size,
        steps_per_epoch=steps_per_epoch, history=history, early_stopping_patience=early_stopping_patience,
        checkpoint_every_steps=checkpoint_every_steps, preemption=preemption,
        steps_per_execution=steps_per_execution, jit_compile=jit_compile,
    )
    try:
        # A phase-2 checkpoint holds the whole model: phase 1 is then over and need not be restored.
        if not tf.train.latest_checkpoint(tf.io.gfile.join(model_dir, loop.CHECKPOINT_DIR, "phase2")):
            with strategy.scope():
                optimizer = make_optimizer(learning_rate, precision, model)
            loop.train_phase(
                phase="phase1", optimizer=optimizer, initial_epoch=0, epochs=epochs, profile_steps=profile_steps,
                **phase_arguments,
            )
        if fine_tune_epochs > 0:
            with strategy.scope():
                frozen = model_lib.unfreeze_backbone(model, fine_tune_at)
                # A fresh optimizer at the lower rate, for the new set of trainable weights: large early
                # updates would overwrite the pretrained features.
                optimizer = make_optimizer(fine_tune_learning_rate, precision, model)
            logging.info("phase2: backbone layers %d and up unfrozen (BatchNormalization stays frozen)", frozen)
            loop.train_phase(
                phase="phase2", optimizer=optimizer, initial_epoch=epochs, epochs=epochs + fine_tune_epochs,
                profile_steps=None, **phase_arguments,
            )
    finally:
        preemption.close()

    results = loop.evaluate(loop.make_evaluation_step(model=model, strategy=strategy), dataset(eval_split, training=False))
    metrics = {
        "evaluated_split": eval_split,
        "num_examples": manifest["splits"][eval_split]["num_examples"],
        **results,
        "backbone": backbone,
        "image_size": image_size,
        "num_classes": len(class_names),
        "num_replicas": strategy.num_replicas_in_sync,
        "history": history.epochs,
    }
    logging.info("%s accuracy %.4f, loss %.4f", eval_split, metrics["accuracy"], metrics["loss"])
    # Every worker logs this; under multi_worker they must agree (the tests compare them).
    logging.info("weights fingerprint %s", weights_fingerprint(model))
    export_dir = tf.io.gfile.join(model_dir, export.SAVED_MODEL_DIR)
    # Every worker exports (saving may need collectives); only the chief's copy is kept.
    export_write_dir = distribute.write_dir(export_dir, strategy)
    export.export_saved_model(model=model, class_names=class_names, image_size=image_size, export_dir=export_write_dir)
    distribute.remove_write_dir(export_write_dir, strategy)
    if chief:
        loop.write_text(tf.io.gfile.join(model_dir, "metrics.json"), json.dumps(metrics, indent=2))
        loop.write_text(tf.io.gfile.join(model_dir, "labels.txt"), "".join(name + "\n" for name in class_names))
        model.save(tf.io.gfile.join(model_dir, export.KERAS_MODEL_FILE))
    return metrics


def own_flags_text() -> str:
    """This module's flags as a --flagfile (so a run can be repeated with --flagfile=flags.txt)."""
    module = FLAGS.find_module_defining_flag("data_dir")
    return "".join(flag.serialize() + "\n" for flag in FLAGS.get_flags_for_module(module) if flag.value is not None)


def define_flags() -> None:
    """Defines this program's flags; called by run(), not at import, so modules that share flag
    names (--model_dir, --seed) can be imported together by tests and other code."""
    flags.DEFINE_string("data_dir", None, "Output folder of `python -m tfrecords.build` (local or gs://).")
    flags.DEFINE_string("model_dir", None, "Where checkpoints, logs, metrics and the exported model go (local or gs://).")
    flags.DEFINE_string(
        "backbone", "mobilenet_v2",
        f"One of {sorted(model_lib.BACKBONES)}, or a path to a .keras feature-extractor file (then set --preprocess).",
    )
    flags.DEFINE_string(
        "weights", "imagenet",
        "Backbone weights: imagenet (downloaded by Keras, or read from ~/.keras/models offline), none (random), "
        "or a path to a weights file.",
    )
    flags.DEFINE_enum(
        "preprocess", "auto", ["auto", *model_lib.PREPROCESS_MODES],
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
    flags.DEFINE_integer("epochs", 5, "Phase-1 epochs: head only, backbone frozen.")
    flags.DEFINE_integer("fine_tune_epochs", 5, "Phase-2 epochs: top of the backbone unfrozen; 0 skips phase 2.")
    flags.DEFINE_float("learning_rate", 1e-3, "Phase-1 Adam learning rate.")
    flags.DEFINE_float("fine_tune_learning_rate", None, "Phase-2 Adam learning rate; default --learning_rate / 10.")
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
        "augment_on", "host", ["host", "device"],
        "Where the --augment_* Keras layers run: host (in tf.data) or device (first layers of the model, on the "
        "GPU/TPU, inactive at inference).",
    )
    flags.DEFINE_bool("augment_flip", True, "Random horizontal flips (done in the decode, on the host).")
    flags.DEFINE_float(
        "augment_rotation", 0.0,
        "RandomRotation factor, a fraction of a full turn; 0 = off. Costly on a CPU host: prefer --augment_on=device.",
    )
    flags.DEFINE_float("augment_zoom", 0.0, "RandomZoom factor; 0 = off.")
    flags.DEFINE_float("augment_translation", 0.0, "RandomTranslation factor, a fraction of height and width; 0 = off.")
    flags.DEFINE_float("augment_contrast", 0.0, "RandomContrast factor; 0 = off.")
    flags.DEFINE_float("augment_brightness", 0.0, "RandomBrightness factor, a fraction of 255; 0 = off.")
    flags.DEFINE_float("crop_min_area", 0.25, "Smallest share of an image a random training crop covers; 1 = no random crop.")
    flags.DEFINE_bool("deterministic", False, "Fixed element order in training (slower); with --seed, runs repeat exactly.")
    flags.DEFINE_string("cache", "", "Cache the encoded examples: '' (none), 'memory', or a local folder for cache files.")
    flags.DEFINE_float(
        "autotune_ram_budget_gb", 0.0, "RAM tf.data AUTOTUNE may use for buffers; 0 = TensorFlow's default (half the RAM)."
    )
    flags.DEFINE_integer("data_threads", 0, "Size of a private tf.data thread pool; 0 = TensorFlow's shared pool.")
    flags.DEFINE_string(
        "tf_data_service", "",
        "grpc://host:port of a tf.data service dispatcher to run the training pipeline on (extra CPU hosts); '' = here.",
    )
    flags.DEFINE_enum(
        "tf_data_service_mode", "parallel_epochs", ["parallel_epochs", "distributed_epoch"],
        "parallel_epochs: every service worker runs the whole pipeline; distributed_epoch: workers split the files.",
    )
    flags.DEFINE_integer("early_stopping_patience", 0, "Stop a phase after this many epochs without val_loss gain; 0 = off.")
    flags.DEFINE_string(
        "profile_batches", "",
        "Trace these phase-1 training steps (from 1), e.g. '10,20', for TensorBoard's profiler; '' = off.",
    )
    flags.DEFINE_integer(
        "steps_per_execution", 1,
        "Training steps per tf.function call. TPUs want many (e.g. 50) to avoid a host round trip per step; "
        "above 1 the per-epoch input-wait share cannot be measured.",
    )
    flags.DEFINE_bool("jit_compile", False, "XLA-compile the training step (helps GPUs; slow on CPUs; TPUs always compile).")
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
    flags.DEFINE_integer("seed", 42, "Random seed for weights initialisation, shuffling and augmentation.")


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """Parses --profile_batches ("10,20", or "" for off) into (first, last) steps, counted from 1."""
    if not text.strip():
        return None
    parts = text.split(",")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"--profile_batches {text!r} must be 'FIRST,LAST' step numbers, e.g. '10,20'")
    first, last = (int(part) for part in parts)
    if not 1 <= first <= last:
        raise ValueError(f"--profile_batches {text!r} needs 1 <= FIRST <= LAST")
    return first, last


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
        model_lib.check_backbone_name(FLAGS.backbone)
        preprocess = model_lib.resolve_preprocess(FLAGS.backbone, FLAGS.preprocess)
        if FLAGS.weights not in ("imagenet", "none") and not tf.io.gfile.exists(FLAGS.weights):
            raise ValueError(f"--weights {FLAGS.weights!r} is neither imagenet, none nor an existing weights file")
        profile_steps = parse_profile_steps(FLAGS.profile_batches)
        augmentation_factors = {
            name: getattr(FLAGS, f"augment_{name}") if FLAGS.augment else 0.0
            for name in ("rotation", "zoom", "translation", "contrast", "brightness")
        }
        data.make_augmentation(**augmentation_factors)  # raises ValueError naming a bad --augment_* value
        if not 0.0 < FLAGS.crop_min_area <= 1.0:
            raise ValueError(f"--crop_min_area {FLAGS.crop_min_area} must be in (0, 1]")
        manifest = data.read_manifest(FLAGS.data_dir)
        if len(manifest["classes"]) < 2:
            raise ValueError(f"--data_dir {FLAGS.data_dir!r} has {len(manifest['classes'])} class; need at least 2")
        for split in ("train", "validation"):
            data.shard_paths(FLAGS.data_dir, manifest, split)
        if FLAGS.steps_per_execution < 1:
            raise ValueError(f"--steps_per_execution {FLAGS.steps_per_execution} must be at least 1")
        distribute.check_batch_size(FLAGS.batch_size, strategy.num_replicas_in_sync)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    image_size = FLAGS.image_size or model_lib.default_image_size(FLAGS.backbone)
    learning_rate = FLAGS.learning_rate
    fine_tune_learning_rate = FLAGS.fine_tune_learning_rate or learning_rate / 10
    if FLAGS.learning_rate_scaling == "linear":
        learning_rate *= FLAGS.batch_size / FLAGS.base_batch_size
        fine_tune_learning_rate *= FLAGS.batch_size / FLAGS.base_batch_size
    logging.info("learning rates: %g (phase 1), %g (phase 2)", learning_rate, fine_tune_learning_rate)
    flags_text = own_flags_text()
    logging.info("flags:\n%s", flags_text)
    logging.info("strategy %s with %d replicas", FLAGS.strategy, strategy.num_replicas_in_sync)
    if distribute.is_chief(strategy):
        tf.io.gfile.makedirs(FLAGS.model_dir)
        loop.write_text(tf.io.gfile.join(FLAGS.model_dir, "flags.txt"), flags_text)
    try:
        metrics = train_and_export(
            strategy=strategy,
            data_dir=FLAGS.data_dir,
            manifest=manifest,
            model_dir=FLAGS.model_dir,
            backbone=FLAGS.backbone,
            weights=FLAGS.weights,
            preprocess=preprocess,
            image_size=image_size,
            batch_size=FLAGS.batch_size,
            precision=FLAGS.precision,
            epochs=FLAGS.epochs,
            fine_tune_epochs=FLAGS.fine_tune_epochs,
            learning_rate=learning_rate,
            fine_tune_learning_rate=fine_tune_learning_rate,
            fine_tune_at=FLAGS.fine_tune_at,
            dropout=FLAGS.dropout,
            steps_per_epoch=FLAGS.steps_per_epoch,
            augment_on=FLAGS.augment_on,
            augmentation_factors=augmentation_factors,
            dataset_arguments=dict(
                flip=FLAGS.augment and FLAGS.augment_flip,
                crop_min_area=FLAGS.crop_min_area if FLAGS.augment else 1.0,
                shuffle_buffer=FLAGS.shuffle_buffer,
                deterministic=FLAGS.deterministic,
                cache=FLAGS.cache,
                ram_budget_gb=FLAGS.autotune_ram_budget_gb,
                private_threads=FLAGS.data_threads,
                data_service=FLAGS.tf_data_service,
                data_service_mode=FLAGS.tf_data_service_mode,
            ),
            early_stopping_patience=FLAGS.early_stopping_patience,
            profile_steps=profile_steps,
            checkpoint_every_steps=FLAGS.checkpoint_every_steps,
            steps_per_execution=FLAGS.steps_per_execution,
            jit_compile=FLAGS.jit_compile,
            seed=FLAGS.seed,
        )
    except loop.Preempted as stop:
        print(f"preempted: {stop}; rerun the same command to resume", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except FloatingPointError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    if distribute.is_chief(strategy):
        print(
            f"{metrics['evaluated_split']} accuracy {metrics['accuracy']:.4f} on {metrics['num_examples']} images; "
            f"model in {FLAGS.model_dir} (SavedModel: {tf.io.gfile.join(FLAGS.model_dir, export.SAVED_MODEL_DIR)})"
        )


def run() -> None:
    """Entry point of `python -m` and of the console script."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
