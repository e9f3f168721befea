"""Evaluates a trained model on one split: metrics table, confusion matrix, worst errors, learning curves.

    python -m trainer.evaluate --model_dir=/tmp/flowers_model --data_dir=/tmp/flowers_tfrecords --split=test

Loads <model_dir>/model.keras, streams the split once (central crops, as in training's evaluation), and writes
into --output_dir (default <model_dir>/evaluation_<split>): evaluation.json (accuracy, top-k accuracy,
per-class precision/recall/F1, macro and weighted averages, confusion matrix), evaluation.txt (the same as a
table, also printed), confusion_matrix.png and errors.png (the most confident misclassifications). When
<model_dir>/history.json exists it also writes <model_dir>/learning_curves.png. Paths may be local or gs://.
"""

import json
import sys

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from tfrecords import schema
from trainer import data, export, loop, report
from trainer import model as model_lib  # noqa: F401  (registers Preprocess, a layer model.keras holds)

FLAGS = flags.FLAGS

EVALUATION_JSON = "evaluation.json"
EVALUATION_TEXT = "evaluation.txt"
CONFUSION_MATRIX_PNG = "confusion_matrix.png"
ERRORS_PNG = "errors.png"
LEARNING_CURVES_PNG = "learning_curves.png"


def evaluate_model(
    *,
    model: keras.Model,
    data_dir: str,
    manifest: dict,
    split: str,
    image_size: int,
    batch_size: int,
    class_names: list[str],
    top_k: int,
    output_dir: str,
    max_error_images: int = 16,
) -> dict:
    """Runs a model over one split and writes its report and plots into output_dir.

    Runs in this process on its default device, outside any tf.distribute strategy; only the worst
    `max_error_images` misclassified images are kept in memory, never the whole split.

    Args:
        model: a classifier taking float RGB [0, 255] images and returning probabilities.
        data_dir: the converter's output folder (local or gs://).
        manifest: its manifest (data.read_manifest).
        split: the split to evaluate ("test", "validation" or "train").
        image_size: the model's input height and width.
        batch_size: images per model call.
        class_names: names in class-id order.
        top_k: k of the top-k accuracy (capped at the number of classes).
        output_dir: folder for evaluation.json, evaluation.txt, confusion_matrix.png and errors.png;
            created if missing.
        max_error_images: most misclassified images in errors.png.

    Returns:
        report.classification_report's dict, plus split and data_dir (what evaluation.json holds).
    """
    if top_k < 1:
        raise ValueError(f"--top_k {top_k} must be at least 1")
    dataset = data.make_dataset(
        data_dir=data_dir, manifest=manifest, split=split, image_size=image_size, batch_size=batch_size,
        training=False,
    )
    # One trace: every batch has the same shape (the last one is padded).
    predict = tf.function(lambda images: model(images, training=False))
    worst_errors = report.WorstErrors(max_error_images)
    all_labels, all_probabilities = [], []
    for images, labels, sample_weights in dataset:
        real = sample_weights.numpy() > 0  # weight 0: padding that fills the last batch
        probabilities = np.asarray(predict(images), dtype=np.float32)[real]
        labels = labels.numpy()[real]
        all_labels.append(labels)
        all_probabilities.append(probabilities)
        worst_errors.add(images.numpy()[real], labels, probabilities)
    labels = np.concatenate(all_labels)
    probabilities = np.concatenate(all_probabilities)
    result = report.classification_report(
        labels=labels, probabilities=probabilities, class_names=class_names, top_k=top_k
    )
    result = {"split": split, "data_dir": data_dir, **result}
    tf.io.gfile.makedirs(output_dir)
    loop.write_text(tf.io.gfile.join(output_dir, EVALUATION_JSON), json.dumps(result, indent=2))
    loop.write_text(tf.io.gfile.join(output_dir, EVALUATION_TEXT), report.format_report(result))
    report.plot_confusion_matrix(
        matrix=result["confusion_matrix"], class_names=class_names,
        path=tf.io.gfile.join(output_dir, CONFUSION_MATRIX_PNG),
    )
    report.plot_errors(
        images=worst_errors.images, labels=worst_errors.labels, probabilities=worst_errors.probabilities,
        class_names=class_names, path=tf.io.gfile.join(output_dir, ERRORS_PNG), max_images=max_error_images,
    )
    return result


def write_learning_curves(model_dir: str) -> str | None:
    """Plots <model_dir>/history.json into <model_dir>/learning_curves.png.

    Returns:
        The PNG's path, or None when the model_dir has no (or an empty) history.
    """
    history_path = tf.io.gfile.join(model_dir, loop.HISTORY_FILE)
    if not tf.io.gfile.exists(history_path):
        return None
    with tf.io.gfile.GFile(history_path, "r") as file:
        history = json.load(file)
    if not history:
        return None
    path = tf.io.gfile.join(model_dir, LEARNING_CURVES_PNG)
    report.plot_learning_curves(history=history, path=path)
    return path


def load_model(model_dir: str) -> keras.Model:
    """Loads <model_dir>/model.keras, the Keras model trainer.train saves at the end of a run."""
    path = tf.io.gfile.join(model_dir, export.KERAS_MODEL_FILE)
    if not tf.io.gfile.exists(path):
        raise ValueError(
            f"--model_dir {model_dir!r} has no {export.KERAS_MODEL_FILE}; train first: "
            "python -m trainer.train --data_dir=<data_dir> --model_dir=<model_dir>"
        )
    return keras.saving.load_model(path, compile=False)


def model_image_size(model: keras.Model) -> int:
    """The square input size of a classifier, from its input shape [batch, height, width, 3]."""
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2]:
        raise ValueError(f"the model's input shape is {shape}; expected [batch, size, size, 3] with a fixed size")
    return int(shape[1])


def check_class_names(*, model_dir: str, data_dir: str, class_names: list[str], num_outputs: int) -> None:
    """Checks the data's classes match the model's outputs and the labels.txt it was trained with."""
    if len(class_names) != num_outputs:
        raise ValueError(
            f"--data_dir {data_dir!r} has {len(class_names)} classes but the model predicts {num_outputs}; "
            "evaluate on data converted from the same classes as the training data"
        )
    labels_path = tf.io.gfile.join(model_dir, schema.LABELS_FILE)
    if tf.io.gfile.exists(labels_path):
        with tf.io.gfile.GFile(labels_path, "r") as file:
            trained_names = file.read().splitlines()
        if trained_names != list(class_names):
            raise ValueError(
                f"--data_dir {data_dir!r} classes {class_names} differ from the model's {labels_path} "
                f"{trained_names}; evaluate on data converted from the same classes as the training data"
            )


def define_flags() -> None:
    """Defines this program's flags; called by run(), not at import, so modules that share flag
    names (--model_dir, --data_dir) can be imported together by tests and other code."""
    flags.DEFINE_string("model_dir", None, "The --model_dir of a finished `python -m trainer.train` run.")
    flags.DEFINE_string("data_dir", None, "Output folder of `python -m tfrecords.build` (local or gs://).")
    flags.DEFINE_string("split", "test", "Split of --data_dir to evaluate: test, validation or train.")
    flags.DEFINE_integer("top_k", 5, "k of the top-k accuracy (capped at the number of classes).")
    flags.DEFINE_integer("batch_size", 32, "Images per model call; lower it if the device runs out of memory.")
    flags.DEFINE_integer("max_error_images", 16, "Most misclassified images shown in errors.png.")
    flags.DEFINE_string(
        "output_dir", "", "Where the report and plots go (local or gs://); '' = <model_dir>/evaluation_<split>."
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        if not FLAGS.model_dir or not FLAGS.data_dir:
            raise ValueError("--model_dir and --data_dir are required")
        if FLAGS.top_k < 1:
            raise ValueError(f"--top_k {FLAGS.top_k} must be at least 1")
        if FLAGS.batch_size < 1:
            raise ValueError(f"--batch_size {FLAGS.batch_size} must be at least 1")
        if FLAGS.max_error_images < 0:
            raise ValueError(f"--max_error_images {FLAGS.max_error_images} must be 0 or more")
        manifest = data.read_manifest(FLAGS.data_dir)
        data.shard_paths(FLAGS.data_dir, manifest, FLAGS.split)  # raises naming the splits there are
        data.check_data(FLAGS.data_dir, manifest)
        model = load_model(FLAGS.model_dir)
        class_names = manifest["classes"]
        check_class_names(
            model_dir=FLAGS.model_dir, data_dir=FLAGS.data_dir, class_names=class_names,
            num_outputs=int(model.output_shape[-1]),
        )
        output_dir = FLAGS.output_dir or tf.io.gfile.join(FLAGS.model_dir, f"evaluation_{FLAGS.split}")
        with data.data_errors(FLAGS.data_dir, manifest):
            result = evaluate_model(
                model=model,
                data_dir=FLAGS.data_dir,
                manifest=manifest,
                split=FLAGS.split,
                image_size=model_image_size(model),
                batch_size=FLAGS.batch_size,
                class_names=class_names,
                top_k=FLAGS.top_k,
                output_dir=output_dir,
                max_error_images=FLAGS.max_error_images,
            )
        learning_curves = write_learning_curves(FLAGS.model_dir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{FLAGS.split} split of {FLAGS.data_dir}: {result['num_examples']} images\n")
    print(report.format_report(result))
    for name in (EVALUATION_JSON, EVALUATION_TEXT, CONFUSION_MATRIX_PNG, ERRORS_PNG):
        print(f"wrote {tf.io.gfile.join(output_dir, name)}")
    if learning_curves:
        print(f"wrote {learning_curves}")


def run() -> None:
    """Entry point of `python -m` and of the console script."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
