"""Labels image files with an exported model.

    python -m trainer.predict --model_dir=/tmp/flowers_model photo.jpg more_photos/

Prints one line per image: path, predicted class name, probability. Folders are searched recursively
(hidden files skipped); paths may be local or gs://. Files that cannot be decoded are reported on stderr
and the run exits with code 1 after labelling the rest.
"""

import sys

import tensorflow as tf
from absl import app, flags

from trainer import export

FLAGS = flags.FLAGS


def list_images(paths: list[str]) -> list[str]:
    """Expands folders (recursively, hidden entries skipped) and globs, keeping the arguments' order."""
    files = []
    for path in paths:
        if tf.io.gfile.isdir(path):
            found = []
            for folder, subfolders, names in tf.io.gfile.walk(path):
                subfolders[:] = [name for name in subfolders if not name.startswith(".")]
                found.extend(tf.io.gfile.join(folder, name) for name in names if not name.startswith("."))
            files.extend(sorted(found))
        elif tf.io.gfile.exists(path):
            files.append(path)
        else:
            matches = tf.io.gfile.glob(path)
            if not matches:
                raise ValueError(f"{path!r} is neither a file, a folder nor a glob that matches anything")
            files.extend(sorted(matches))
    return files


def predict_file(serve, path: str) -> tuple[str, float]:
    """Returns (class name, probability) for one image file."""
    with tf.io.gfile.GFile(path, "rb") as file:
        encoded = file.read()
    outputs = serve(image_bytes=tf.constant([encoded]))
    class_id = int(outputs["class_ids"][0])
    return outputs["class_names"][0].numpy().decode("utf-8"), float(outputs["probabilities"][0, class_id])


def define_flags() -> None:
    """Defines this program's flags; called by run(), not at import, so modules that share flag
    names (--model_dir, --seed) can be imported together by tests and other code."""
    flags.DEFINE_string("model_dir", None, "The --model_dir of a finished `python -m trainer.train` run.")


def main(argv: list[str]) -> None:
    try:
        if not FLAGS.model_dir:
            raise ValueError("--model_dir is required")
        if len(argv) < 2:
            raise ValueError("give at least one image file or folder after the flags")
        serve = export.load_serving_function(tf.io.gfile.join(FLAGS.model_dir, export.SAVED_MODEL_DIR))
        files = list_images(argv[1:])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    failures = 0
    for path in files:
        try:
            class_name, probability = predict_file(serve, path)
        except tf.errors.InvalidArgumentError:
            failures += 1
            print(f"error: {path}: not a decodable image", file=sys.stderr)
            continue
        print(f"{path}\t{class_name}\t{probability:.4f}")
    if failures:
        sys.exit(1)


def run() -> None:
    """Entry point of `python -m` and of the console script."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
