r"""Two-phase transfer learning on the converter's shards, then evaluation and export.

    python -m trainer.train --data_dir=/tmp/flowers_tfrecords --model_dir=/tmp/flowers_model \
        --backbone=mobilenet_v2 --epochs=5 --fine_tune_epochs=5

Phase 1 trains a new head on the frozen backbone; phase 2 unfreezes the backbone from --fine_tune_at
(BatchNormalization stays in inference mode) and continues at a lower learning rate, with the epoch count
continuing so TensorBoard shows one curve per metric. Re-running the same command after an interruption
resumes: finished phases are loaded from <model_dir>/state, an unfinished one restarts at its last
completed epoch (keras.callbacks.BackupAndRestore).
"""

import json
import sys

import keras
import tensorflow as tf
from absl import app, flags, logging

from trainer import data, distribute, export, model as model_lib

FLAGS = flags.FLAGS

STATE_DIR = "state"
BACKUP_DIR = "backup"
LOG_DIR = "logs"
BEST_CHECKPOINT = "checkpoints/best.weights.h5"
PHASES = ("phase1", "phase2")


def write_text(path: str, text: str) -> None:
    """Writes a small text file through tf.io.gfile (temporary name, then rename: never half-written)."""
    temporary = path + ".incomplete"
    with tf.io.gfile.GFile(temporary, "w") as file:
        file.write(text)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def make_callbacks(*, model_dir: str, phase: str, best_checkpoint, early_stopping_patience: int, profile_batches: str):
    """Returns the callbacks of one phase. `best_checkpoint` is shared so "best" spans both phases."""
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.BackupAndRestore(tf.io.gfile.join(model_dir, BACKUP_DIR, phase)),
        keras.callbacks.TensorBoard(
            log_dir=tf.io.gfile.join(model_dir, LOG_DIR),
            profile_batch=profile_batches if (profile_batches and phase == PHASES[0]) else 0,
        ),
        best_checkpoint,
    ]
    if early_stopping_patience > 0:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=early_stopping_patience))
    return callbacks


def run_phase(
    *,
    model: keras.Model,
    phase: str,
    model_dir: str,
    train_dataset: tf.data.Dataset,
    validation_dataset: tf.data.Dataset,
    initial_epoch: int,
    epochs: int,
    steps_per_epoch: int,
    validation_steps: int | None,
    callbacks: list,
) -> dict:
    """Fits one phase, or loads it when an earlier run already finished it. Returns its history."""
    weights_path = tf.io.gfile.join(model_dir, STATE_DIR, f"{phase}.weights.h5")
    history_path = tf.io.gfile.join(model_dir, STATE_DIR, f"{phase}.history.json")
    if tf.io.gfile.exists(weights_path):
        logging.info("%s already finished in an earlier run: loading %s (delete --model_dir to retrain)", phase, weights_path)
        if not model.optimizer.built:
            # The file holds this phase's optimizer state too; building first makes it load cleanly.
            model.optimizer.build(model.trainable_variables)
        model.load_weights(weights_path)
        with tf.io.gfile.GFile(history_path, "r") as file:
            return json.load(file)
    logging.info("%s: epochs %d to %d, %d trainable weights", phase, initial_epoch + 1, epochs, len(model.trainable_weights))
    history = model.fit(
        train_dataset,
        validation_data=validation_dataset,
        initial_epoch=initial_epoch,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_steps=validation_steps,
        callbacks=callbacks,
        shuffle=False,  # the dataset shuffles itself; Keras cannot shuffle a tf.data.Dataset
        verbose=1 if sys.stdout.isatty() else 2,
    )
    history_dict = {name: [float(value) for value in values] for name, values in history.history.items()}
    history_dict["epoch"] = [int(epoch) + 1 for epoch in history.epoch]
    # Weights first, history last: the weights file only counts as "phase finished" once both exist.
    tf.io.gfile.makedirs(tf.io.gfile.join(model_dir, STATE_DIR))
    temporary = weights_path.replace(".weights.h5", ".incomplete.weights.h5")
    model.save_weights(temporary)
    write_text(history_path, json.dumps(history_dict, indent=2))
    tf.io.gfile.rename(temporary, weights_path, overwrite=True)
    return history_dict


def compile_model(model: keras.Model, learning_rate: float) -> None:
    """Compiles for one phase; call it inside strategy.scope(), again after changing `trainable`."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        # Weighted, so the zero-weight padding of the last evaluation batch is not counted.
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


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
    validation_steps: int,
    shuffle_buffer: int,
    augmentation,
    early_stopping_patience: int,
    profile_batches: str,
    seed: int,
) -> dict:
    """Runs both phases, evaluates, exports, and returns the metrics written to metrics.json.

    Args: as the flags of the same names; `preprocess` is already resolved, `augmentation` is built by
    data.make_augmentation, `fine_tune_learning_rate` is already defaulted.
    """
    class_names = manifest["classes"]
    num_train = manifest["splits"]["train"]["num_examples"]
    steps_per_epoch = steps_per_epoch or max(1, num_train // batch_size)
    eval_split = "test" if "test" in manifest["splits"] else "validation"
    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy(precision)

    def dataset(split, training):
        return data.make_dataset(
            data_dir=data_dir, manifest=manifest, split=split, image_size=image_size, batch_size=batch_size,
            training=training, augmentation=augmentation, shuffle_buffer=shuffle_buffer, seed=seed,
        )

    train_dataset = dataset("train", training=True)
    validation_dataset = dataset("validation", training=False)

    with strategy.scope():
        model = model_lib.build_model(
            backbone=backbone, num_classes=len(class_names), image_size=image_size,
            weights=weights, preprocess=preprocess, dropout=dropout,
        )
        compile_model(model, learning_rate)
    best_checkpoint = keras.callbacks.ModelCheckpoint(
        tf.io.gfile.join(model_dir, BEST_CHECKPOINT), monitor="val_accuracy", mode="max",
        save_best_only=True, save_weights_only=True,
    )
    phase_arguments = dict(
        model=model, model_dir=model_dir, train_dataset=train_dataset, validation_dataset=validation_dataset,
        steps_per_epoch=steps_per_epoch, validation_steps=validation_steps or None,
    )

    def callbacks(phase):
        return make_callbacks(
            model_dir=model_dir, phase=phase, best_checkpoint=best_checkpoint,
            early_stopping_patience=early_stopping_patience, profile_batches=profile_batches,
        )

    histories = {"phase1": run_phase(phase="phase1", initial_epoch=0, epochs=epochs, callbacks=callbacks("phase1"), **phase_arguments)}
    if fine_tune_epochs > 0:
        with strategy.scope():
            frozen = model_lib.unfreeze_backbone(model, fine_tune_at)
            # Recompile: Keras reads `trainable` at compile time, and the lower rate keeps the
            # pretrained features from being overwritten by large early updates.
            compile_model(model, fine_tune_learning_rate)
        logging.info("phase2: backbone layers %d and up unfrozen (BatchNormalization stays frozen)", frozen)
        histories["phase2"] = run_phase(
            phase="phase2", initial_epoch=epochs, epochs=epochs + fine_tune_epochs, callbacks=callbacks("phase2"),
            **phase_arguments,
        )

    results = model.evaluate(dataset(eval_split, training=False), return_dict=True, verbose=0)
    metrics = {
        "evaluated_split": eval_split,
        "num_examples": manifest["splits"][eval_split]["num_examples"],
        **{name: float(value) for name, value in results.items()},
        "backbone": backbone,
        "image_size": image_size,
        "num_classes": len(class_names),
        "num_replicas": strategy.num_replicas_in_sync,
        "history": histories,
    }
    logging.info("%s accuracy %.4f, loss %.4f", eval_split, metrics["accuracy"], metrics["loss"])
    write_text(tf.io.gfile.join(model_dir, "metrics.json"), json.dumps(metrics, indent=2))
    write_text(tf.io.gfile.join(model_dir, "labels.txt"), "".join(name + "\n" for name in class_names))
    model.save(tf.io.gfile.join(model_dir, export.KERAS_MODEL_FILE))
    export.export_saved_model(
        model=model, class_names=class_names, image_size=image_size,
        export_dir=tf.io.gfile.join(model_dir, export.SAVED_MODEL_DIR),
    )
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
    flags.DEFINE_integer("validation_steps", 0, "Validation batches per epoch; 0 = the whole validation split.")
    flags.DEFINE_integer("shuffle_buffer", 1000, "Examples in the training shuffle buffer.")
    flags.DEFINE_bool("augment_flip", True, "Random horizontal flips (keras.layers.RandomFlip).")
    flags.DEFINE_float("augment_rotation", 0.1, "RandomRotation factor, a fraction of a full turn; 0 = off.")
    flags.DEFINE_float("augment_zoom", 0.1, "RandomZoom factor; 0 = off.")
    flags.DEFINE_integer("early_stopping_patience", 0, "Stop a phase after this many epochs without val_loss gain; 0 = off.")
    flags.DEFINE_string("profile_batches", "", "Profile these batches, e.g. '10,20', into the TensorBoard logs; '' = off.")
    flags.DEFINE_integer("seed", 42, "Random seed for weights initialisation, shuffling and augmentation.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Before anything else touches TensorFlow's devices.
    distribute.split_cpu(FLAGS.num_cpu_devices)
    try:
        if not FLAGS.data_dir or not FLAGS.model_dir:
            raise ValueError("--data_dir and --model_dir are required")
        model_lib.check_backbone_name(FLAGS.backbone)
        preprocess = model_lib.resolve_preprocess(FLAGS.backbone, FLAGS.preprocess)
        if FLAGS.weights not in ("imagenet", "none") and not tf.io.gfile.exists(FLAGS.weights):
            raise ValueError(f"--weights {FLAGS.weights!r} is neither imagenet, none nor an existing weights file")
        manifest = data.read_manifest(FLAGS.data_dir)
        if len(manifest["classes"]) < 2:
            raise ValueError(f"--data_dir {FLAGS.data_dir!r} has {len(manifest['classes'])} class; need at least 2")
        for split in ("train", "validation"):
            data.shard_paths(FLAGS.data_dir, manifest, split)
        strategy = distribute.make_strategy(FLAGS.strategy, tpu=FLAGS.tpu)
        distribute.check_batch_size(FLAGS.batch_size, strategy.num_replicas_in_sync)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    image_size = FLAGS.image_size or model_lib.default_image_size(FLAGS.backbone)
    tf.io.gfile.makedirs(FLAGS.model_dir)
    flags_text = own_flags_text()
    logging.info("flags:\n%s", flags_text)
    write_text(tf.io.gfile.join(FLAGS.model_dir, "flags.txt"), flags_text)
    logging.info("strategy %s with %d replicas", FLAGS.strategy, strategy.num_replicas_in_sync)

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
        learning_rate=FLAGS.learning_rate,
        fine_tune_learning_rate=FLAGS.fine_tune_learning_rate or FLAGS.learning_rate / 10,
        fine_tune_at=FLAGS.fine_tune_at,
        dropout=FLAGS.dropout,
        steps_per_epoch=FLAGS.steps_per_epoch,
        validation_steps=FLAGS.validation_steps,
        shuffle_buffer=FLAGS.shuffle_buffer,
        augmentation=data.make_augmentation(
            flip=FLAGS.augment_flip, rotation=FLAGS.augment_rotation, zoom=FLAGS.augment_zoom, seed=FLAGS.seed
        ),
        early_stopping_patience=FLAGS.early_stopping_patience,
        profile_batches=FLAGS.profile_batches,
        seed=FLAGS.seed,
    )
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
