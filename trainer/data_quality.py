"""Writes the data-quality report of a converted folder: likely label errors and near-duplicate images.

    python -m trainer.data_quality --data_dir=/tmp/flowers_tfrecords --model_dir=/tmp/flowers_model

Every training run writes this report before it trains (unless --nodata_quality), with the backbone as phase 1
finds it. This program makes it again on its own, for instance after fixing the folder and converting it again:
it embeds every image of --data_dir with <model_dir>/model.keras's feature extractor (the run's final backbone:
after phase 2 it has been fine-tuned on these labels, wrong ones included, which can hide some of them) and
writes data_quality.json and data_quality.png into --output_dir (default --model_dir), then prints one summary
line. The method is trainer/reports/quality.py's; this module reads the flags.
"""

import sys

from absl import app, flags

from tfrecords import cli
from tfrecords import schema
from trainer.input import data
from trainer.reports import evaluation
from trainer.reports import quality

flags.DEFINE_string("model_dir", None, "The --model_dir of a `python -m trainer.train` run (its model.keras embeds).")
flags.DEFINE_string("data_dir", None, "Output folder of `python -m tfrecords.build` (local or gs://).")
flags.DEFINE_string("output_dir", "", "Where data_quality.json and .png go (local or gs://); '' = --model_dir.")
flags.DEFINE_float(
    "similarity", 0.98, "Correlation of two images' 16 x 16 grayscale thumbnails from which they are near-duplicates."
)
flags.DEFINE_integer("folds", 5, "Logistic regressions (folds) whose out-of-fold predictions score the labels.")
flags.DEFINE_integer("max_listed", 200, "Most label issues, near-duplicate pairs and groups listed in the report.")
flags.DEFINE_integer("max_images", 200_000, "A larger folder is reported on a stable sample of this many images.")
flags.DEFINE_integer("batch_size", 64, "Images per feature-extractor call; lower it if memory runs out.")
flags.DEFINE_integer("seed", 0, "Seed of the folds.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        if not FLAGS.model_dir or not FLAGS.data_dir:
            raise ValueError("--model_dir and --data_dir are required")
        options = quality.QualityOptions(
            near_duplicate_similarity=FLAGS.similarity, folds=FLAGS.folds, max_listed=FLAGS.max_listed,
            batch_size=FLAGS.batch_size, seed=FLAGS.seed, max_images=FLAGS.max_images,
        )
        manifest = schema.read_manifest(FLAGS.data_dir)
        data.check_data(FLAGS.data_dir, manifest)
        model = evaluation.load_checked_model(
            model_dir=FLAGS.model_dir, data_dir=FLAGS.data_dir, class_names=manifest["classes"]
        )
        image_size = evaluation.model_image_size(model)
        with data.data_errors(FLAGS.data_dir, manifest):
            report = quality.make_folder_report(model=model, data_dir=FLAGS.data_dir, manifest=manifest,
                                                image_size=image_size, options=options)
            summary = quality.write_report(quality=report, output_dir=FLAGS.output_dir or FLAGS.model_dir,
                                           data_dir=FLAGS.data_dir, manifest=manifest, image_size=image_size)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(summary)


def run() -> None:
    """Entry point of `python -m` and of the console script."""
    app.run(cli.frozen_heap(main), flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
