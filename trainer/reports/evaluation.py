"""The evaluation report of a trained model on one split: metrics table, confusion matrix, worst errors,
learning curves (used by `python -m trainer.evaluate` and at the end of every training run).
"""

import json

import keras
import numpy as np
import tensorflow as tf

from tfrecords import schema
from trainer.exports import export
from trainer.input import data
from trainer.reports import metrics
from trainer.reports import training_log
from trainer.models import classifier  # noqa: F401  (registers Preprocess, a layer model.keras holds)

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

    Runs in this process on its default device, outside any tf.distribute strategy (a training run of one
    worker instead collects the report in its own evaluation pass: ReportCollector). Only the counts
    (metrics.Counts: the confusion matrix and top-k hits) and the worst `max_error_images` misclassified images
    are kept in memory, never the whole split's predictions.

    Args:
        model: a classifier taking float RGB [0, 255] images and returning probabilities.
        data_dir: the converter's output folder (local or gs://).
        manifest: its manifest (schema.read_manifest).
        split: the split to evaluate ("test", "validation" or "train").
        image_size: the model's input height and width.
        batch_size: images per model call.
        class_names: names in class-id order.
        top_k: k of the top-k accuracy (capped at the number of classes).
        output_dir: folder for evaluation.json, evaluation.txt, confusion_matrix.png and errors.png;
            created if missing.
        max_error_images: most misclassified images in errors.png.

    Returns:
        metrics.classification_report's dict, plus split and data_dir (what evaluation.json holds).
    """
    collector = ReportCollector(num_classes=len(class_names), top_k=top_k, max_error_images=max_error_images)
    dataset = data.make_dataset(
        data_dir=data_dir, manifest=manifest, split=split, image_size=image_size, batch_size=batch_size,
        training=False, options=data.standalone_options(),
    )
    # One trace: every batch has the same shape (the last one is padded).
    predict = tf.function(lambda images: model(images, training=False))
    for images, labels, sample_weights in dataset:
        collector.add(images, labels, sample_weights, predict(images))
    return write_report(collector, split=split, data_dir=data_dir, class_names=class_names, output_dir=output_dir)


class ReportCollector:
    """What the report keeps of a pass over a split: the counts (metrics.Counts) and the `max_error_images` worst
    misclassified images (metrics.WorstErrors); memory does not grow with the split."""

    def __init__(self, *, num_classes: int, top_k: int, max_error_images: int = 16):
        if top_k < 1:
            raise ValueError(f"--top_k {top_k} must be at least 1")
        self.counts = metrics.Counts(num_classes=num_classes, top_k=top_k)
        self.worst_errors = metrics.WorstErrors(max_error_images)

    def add(self, images, labels, weights, probabilities) -> None:
        """One batch: [b, h, w, 3] images, [b] labels, [b] weights (0: padding, left out) and [b, classes]
        probabilities, as numpy arrays or tensors."""
        real = np.asarray(weights) > 0
        probabilities = np.asarray(probabilities, dtype=np.float32)[real]
        labels = np.asarray(labels)[real]
        self.counts.add(labels, probabilities)
        self.worst_errors.add(np.asarray(images)[real], labels, probabilities)


def write_report(collector: ReportCollector, *, split: str, data_dir: str, class_names: list[str],
                 output_dir: str) -> dict:
    """Writes evaluation.json, evaluation.txt, confusion_matrix.png and errors.png of a collected pass into
    output_dir (created if missing); returns what evaluation.json holds."""
    result = {"split": split, "data_dir": data_dir, **collector.counts.report(class_names)}
    tf.io.gfile.makedirs(output_dir)
    schema.write_text(tf.io.gfile.join(output_dir, EVALUATION_JSON), json.dumps(result, indent=2))
    schema.write_text(tf.io.gfile.join(output_dir, EVALUATION_TEXT), metrics.format_report(result))
    metrics.plot_confusion_matrix(
        matrix=result["confusion_matrix"], class_names=class_names,
        path=tf.io.gfile.join(output_dir, CONFUSION_MATRIX_PNG),
    )
    worst = collector.worst_errors
    metrics.plot_errors(
        images=worst.images, labels=worst.labels, probabilities=worst.probabilities, class_names=class_names,
        path=tf.io.gfile.join(output_dir, ERRORS_PNG), max_images=worst.capacity,
    )
    return result


def write_learning_curves(model_dir: str, output_dir: str | None = None) -> str | None:
    """Plots <model_dir>/history.json into <output_dir>/learning_curves.png (output_dir: default model_dir).

    Returns:
        The PNG's path, or None when the model_dir has no (or an empty) history.
    """
    history_path = tf.io.gfile.join(model_dir, training_log.HISTORY_FILE)
    if not tf.io.gfile.exists(history_path):
        return None
    with tf.io.gfile.GFile(history_path, "r") as file:
        history = json.load(file)
    if not history:
        return None
    path = tf.io.gfile.join(output_dir or model_dir, LEARNING_CURVES_PNG)
    metrics.plot_learning_curves(history=history, path=path)
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


def load_checked_model(*, model_dir: str, data_dir: str, class_names: list[str]) -> keras.Model:
    """load_model, then check_class_names against the data's classes (the entry points' first step)."""
    model = load_model(model_dir)
    check_class_names(model_dir=model_dir, data_dir=data_dir, class_names=class_names,
                      num_outputs=int(model.output_shape[-1]))
    return model


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
    trained_names = schema.read_labels(model_dir)
    if trained_names is not None and trained_names != list(class_names):
        labels_path = tf.io.gfile.join(model_dir, schema.LABELS_FILE)
        raise ValueError(
            f"--data_dir {data_dir!r} classes {class_names} differ from the model's {labels_path} "
                f"{trained_names}; evaluate on data converted from the same classes as the training data"
            )
