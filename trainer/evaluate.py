"""Evaluates a trained model on one split: metrics table, confusion matrix, worst errors, learning curves.

    python -m trainer.evaluate --model_dir=/tmp/flowers_model --data_dir=/tmp/flowers_tfrecords

Without --split it evaluates the split training reports: test when the data has one, else validation.
Loads <model_dir>/model.keras, streams the split once (central crops, as in training's evaluation), and writes
into --output_dir (default <model_dir>/evaluation_<split>): evaluation.json (accuracy, top-k accuracy,
per-class precision/recall/F1, macro and weighted averages, confusion matrix), evaluation.txt (the same as a
table, also printed), confusion_matrix.png and errors.png (the most confident misclassifications), and when
<model_dir>/history.json exists learning_curves.png. Nothing is written into --model_dir itself (it may be a
finished run's, or read-only). Paths may be local or gs://.
The work is trainer/reports/evaluation.py's; this module reads the flags.
"""

import sys

import tensorflow as tf
from absl import app, flags

from tfrecords import cli
from tfrecords import schema
from trainer.input import data
from trainer.reports import evaluation
from trainer.reports import metrics

flags.DEFINE_string("model_dir", None, "The --model_dir of a finished `python -m trainer.train` run.")
flags.DEFINE_string("data_dir", None, "Output folder of `python -m tfrecords.build` (local or gs://).")
flags.DEFINE_string(
    "split", "", "Split of --data_dir to evaluate: test, validation or train; '' = the one training reports "
    "(test when the data has one, else validation)."
)
flags.DEFINE_integer("top_k", 5, "k of the top-k accuracy (capped at the number of classes).")
flags.DEFINE_integer("batch_size", 32, "Images per model call; lower it if the device runs out of memory.")
flags.DEFINE_integer("max_error_images", 16, "Most misclassified images shown in errors.png.")
flags.DEFINE_string(
    "output_dir", "", "Where the report and plots go (local or gs://); '' = <model_dir>/evaluation_<split>."
)
FLAGS = flags.FLAGS


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
        manifest = schema.read_manifest(FLAGS.data_dir)
        split = FLAGS.split or data.evaluation_split(manifest)
        data.shard_paths(FLAGS.data_dir, manifest, split)  # raises naming the splits there are
        data.check_data(FLAGS.data_dir, manifest)
        class_names = manifest["classes"]
        model = evaluation.load_checked_model(model_dir=FLAGS.model_dir, data_dir=FLAGS.data_dir, class_names=class_names)
        output_dir = FLAGS.output_dir or tf.io.gfile.join(FLAGS.model_dir, f"evaluation_{split}")
        with data.data_errors(FLAGS.data_dir, manifest):
            result = evaluation.evaluate_model(
                model=model,
                data_dir=FLAGS.data_dir,
                manifest=manifest,
                split=split,
                image_size=evaluation.model_image_size(model),
                batch_size=FLAGS.batch_size,
                class_names=class_names,
                top_k=FLAGS.top_k,
                output_dir=output_dir,
                max_error_images=FLAGS.max_error_images,
            )
        learning_curves = evaluation.write_learning_curves(FLAGS.model_dir, output_dir=output_dir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{split} split of {FLAGS.data_dir}: {result['num_examples']} images\n")
    print(metrics.format_report(result))
    for name in (evaluation.EVALUATION_JSON, evaluation.EVALUATION_TEXT, evaluation.CONFUSION_MATRIX_PNG, evaluation.ERRORS_PNG):
        print(f"wrote {tf.io.gfile.join(output_dir, name)}")
    if learning_curves:
        print(f"wrote {learning_curves}")


def run() -> None:
    """Entry point of `python -m` and of the console script."""
    app.run(cli.frozen_heap(main), flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
