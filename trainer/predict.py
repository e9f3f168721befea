"""Labels image files with an exported model, in batches, and prints or saves the top-k classes.

    python -m trainer.predict --model_dir=/tmp/flowers_model --top_k=3 photo.jpg more_photos/ 'shots/*.png'

PATH arguments are image files, folders (searched recursively, hidden files and folders skipped, each real folder
once: a link loop is a warning) and globs, local or gs://; an argument is a folder or file if one has that name,
else a glob. Files are read a batch at a time (--batch_size) by a few threads, and each batch goes through the
SavedModel's `serving_default` signature in one call; --format=tflite (--tflite_kind=float, dynamic_range or int8)
or --format=onnx labels them with that export instead, the files prepared the same way and the same output. Every
file is first made what the converter stores for training (upright 8-bit RGB, transparent pixels on white), so each
format sees the pixels the model was trained on. Without --output a table is printed; --output=predictions.csv or
--output=predictions.json writes one row / object per image instead (local or gs://): never inside --model_dir or
the folders being labelled, and an existing file only with --overwrite. Each batch's rows are printed or written
before the next batch is labelled, so memory does not grow with the number of files: the output file fills as
<output>.<random>.incomplete, a new file of this run's own, and becomes <output> when every file is done (an error
or Ctrl-C removes it; only a killed run leaves it); should <output> have appeared meanwhile (another run), it is
kept and the run fails, unless --overwrite. Files that cannot be read or decoded are reported on stderr, one line
each (`error: <path>: ...`; so is a name that is not UTF-8), at the end, the rest are still labelled, and the run
exits with code 1; bad flags or paths that match nothing exit with code 2. The work is
trainer/exports/prediction.py's; this module reads the flags.
"""

import sys

from absl import app, flags

from tfrecords import cli
from trainer.exports import export
from trainer.exports import listing
from trainer.exports import output_files
from trainer.exports import prediction

flags.DEFINE_string("model_dir", None, "The --model_dir of a finished `python -m trainer.train` run.")
flags.DEFINE_integer("top_k", 3, "Classes to report per image, best first; above the class count it is clipped.")
flags.DEFINE_integer("batch_size", 32, "Images per call of the model; lower it if memory runs out.")
flags.DEFINE_integer("num_read_threads", 8, "Files read concurrently; raise it for gs:// (latency bound).")
flags.DEFINE_enum("format", "saved_model", list(prediction.MODEL_FORMATS),
                  "The export to label with: saved_model/, tflite/<--tflite_kind file> or model.onnx.")
flags.DEFINE_enum("tflite_kind", "float", list(export.TFLITE_FILES), "With --format=tflite: which TFLite file.")
flags.DEFINE_string(
    "output", None, "Write predictions to this .csv or .json file (local or gs://) instead of printing a table; "
    "not inside --model_dir or the folders being labelled."
)
flags.DEFINE_bool("overwrite", False, "Replace an existing --output file (once every file is labelled).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    try:
        if not FLAGS.model_dir:
            raise ValueError("--model_dir is required: the --model_dir of a finished `python -m trainer.train` run")
        if len(argv) < 2:
            raise ValueError("give at least one image file, folder or glob after the flags")
        if FLAGS.top_k < 1:
            raise ValueError(f"--top_k {FLAGS.top_k} must be at least 1")
        if FLAGS.batch_size < 1:
            raise ValueError(f"--batch_size {FLAGS.batch_size} must be at least 1")
        if FLAGS.num_read_threads < 1:
            raise ValueError(f"--num_read_threads {FLAGS.num_read_threads} must be at least 1")
        listed = listing.list_inputs(argv[1:])
        for warning in listed.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if FLAGS.output:
            output_files.check_output_path(FLAGS.output, overwrite=FLAGS.overwrite, model_dir=FLAGS.model_dir,
                                           listed=listed)
        files = listed.files
        class_names = prediction.read_class_names(FLAGS.model_dir)
        serve = prediction.load_serving(model_dir=FLAGS.model_dir, class_names=class_names, model_format=FLAGS.format,
                                        tflite_kind=FLAGS.tflite_kind)
        batches = prediction.predict_batches(
            serve=serve, paths=files, class_names=class_names, top_k=FLAGS.top_k,
            batch_size=FLAGS.batch_size, num_read_threads=FLAGS.num_read_threads,
        )
        # Each batch is written before the next is labelled, so memory does not grow with the number of files.
        if FLAGS.output:
            with output_files.PredictionFile(FLAGS.output, overwrite=FLAGS.overwrite) as output:
                num_labelled, failures = prediction.write_batches(batches=batches, output=output)
        else:
            table = output_files.PredictionTable(stream=sys.stdout, paths=files, class_names=class_names)
            num_labelled, failures = prediction.write_batches(batches=batches, output=table)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: the output's temporary file is already removed (PredictionFile)
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    for path, reason in {**listed.skipped, **failures}.items():
        print(f"error: {listing.printable(path)}: {reason}", file=sys.stderr)
    if FLAGS.output:
        print(f"wrote {num_labelled} predictions to {FLAGS.output}")
    if failures or listed.skipped:
        sys.exit(1)


def run() -> None:
    """Entry point of `python -m` and of the console script."""
    app.run(cli.frozen_heap(main), flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
