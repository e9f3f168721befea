"""Every export evaluated on the split the run reports, each through its own runtime.

One row per file the run exported: the SavedModel (TensorFlow, its `serving_default` signature fed the encoded
images, as a server would), each TFLite file (LiteRT, or tf.lite.Interpreter without it; one image per call) and
model.onnx (onnxruntime). Each row gives the accuracy, the share of images whose top-1 class agrees with the
SavedModel's, the file size, the runtime, and `flagged` when the accuracy is more than `tolerance` below the
SavedModel's: such an export is kept, with a warning, for the user to judge. The TFLite and ONNX files get the
pixels the SavedModel prepares for itself (trainer.input.data.decode_and_resize), so only the model differs.

The rows go into evaluation.json ("exports"), evaluation.txt and the model card.
"""

import json
import os

import numpy as np
import tensorflow as tf
from absl import logging

from tfrecords import schema
from trainer.exports import export
from trainer.exports import onnx_model
from trainer.input import data
from trainer.reports import evaluation

BATCH_SIZE = 32


def export_files(model_dir: str) -> list[tuple[str, str]]:
    """(format, path) of every export in model_dir that this module evaluates, the SavedModel first."""
    files = [("saved_model", tf.io.gfile.join(model_dir, export.SAVED_MODEL_DIR))]
    for kind, name in export.TFLITE_FILES.items():
        files.append((f"tflite_{kind}", tf.io.gfile.join(model_dir, export.TFLITE_DIR, name)))
    files.append(("onnx", tf.io.gfile.join(model_dir, onnx_model.ONNX_FILE)))
    return [(name, path) for name, path in files if tf.io.gfile.exists(path)]


def evaluate_exports(*, model_dir: str, data_dir: str, manifest: dict, split: str, image_size: int,
                     tolerance: float) -> list[dict]:
    """Runs every export over `split`; returns its rows (see the module docstring), the SavedModel's first."""
    files = export_files(model_dir)
    if not files or files[0][0] != "saved_model":
        raise ValueError(f"no SavedModel in {model_dir!r} to compare the exports with")
    runners = {name: _runner(name, path) for name, path in files}
    labels, predictions = [], {name: [] for name in runners}
    for encoded, batch_labels, pixels in _batches(data_dir, manifest, split, image_size):
        labels.append(batch_labels)
        for name, (run, _) in runners.items():
            predictions[name].append(np.argmax(run(encoded, pixels), axis=1))
    rows = make_rows(
        labels=np.concatenate(labels), predictions={name: np.concatenate(values) for name, values in predictions.items()},
        files=[(name, os.path.relpath(path, model_dir), runners[name][1], file_size(path)) for name, path in files],
        tolerance=tolerance,
    )
    warn_flagged(rows, split=split, tolerance=tolerance)
    return rows


def warn_flagged(rows: list[dict], *, split: str, tolerance: float) -> None:
    """Logs a warning for every flagged row (the SavedModel's is rows[0])."""
    for row in rows:
        if row["flagged"]:
            logging.warning(
                "EXPORT FLAGGED: %s (%s) has %s accuracy %.4f, more than --export_tolerance=%g below the SavedModel's "
                "%.4f; it is kept: check it before you ship it", row["format"], row["path"], split, row["accuracy"],
                tolerance, rows[0]["accuracy"],
            )


def make_rows(*, labels: np.ndarray, predictions: dict, files: list[tuple], tolerance: float) -> list[dict]:
    """The report's rows from each export's top-1 classes.

    Args:
        labels: the split's class ids.
        predictions: format -> top-1 class ids, in the order of labels; "saved_model" is the reference.
        files: (format, path, runtime, size in bytes) per export, in row order.
        tolerance: a row is flagged when its accuracy is more than this below the SavedModel's.
    """
    reference = predictions["saved_model"]
    reference_accuracy = float(np.mean(reference == labels))
    rows = []
    for name, path, runtime, size in files:
        accuracy = float(np.mean(predictions[name] == labels))
        rows.append({
            "format": name, "path": path, "runtime": runtime, "size_bytes": size, "num_examples": int(len(labels)),
            "accuracy": round(accuracy, 4),
            "agreement_with_saved_model": round(float(np.mean(predictions[name] == reference)), 4),
            "flagged": bool(accuracy < reference_accuracy - tolerance - 1e-12),
        })
    return rows


def _runner(name: str, path: str):
    """(predict(encoded, pixels) -> probabilities, runtime name) for one export."""
    if name == "saved_model":
        serve = export.load_serving_function(path)
        return (lambda encoded, pixels: serve(image_bytes=tf.constant(encoded))["probabilities"].numpy(),
                "TensorFlow SavedModel (serving_default)")
    if name == "onnx":
        import onnxruntime  # the onnx extra; a model.onnx exists only where it is installed

        session = onnx_model.load_onnx_session(path)
        return (lambda encoded, pixels: onnx_model.predict_onnx(session=session, images=pixels),
                f"onnxruntime {onnxruntime.__version__}")
    interpreter = export.load_tflite_interpreter(path)
    runtime = "LiteRT" if type(interpreter).__module__.startswith("ai_edge_litert") else "tf.lite.Interpreter"
    return (lambda encoded, pixels: export.predict_tflite(interpreter=interpreter, images=pixels), runtime)


def _batches(data_dir: str, manifest: dict, split: str, image_size: int):
    """(encoded images, labels, float32 pixels) of `split` in batches of BATCH_SIZE, in shard order."""
    class_names = manifest["classes"]

    def prepare(serialized):
        record = data.parse_record(serialized, class_names)
        encoded = record["image/encoded"]
        return encoded, record["image/class/label"], data.decode_and_resize(encoded, image_size)

    dataset = tf.data.TFRecordDataset(data.shard_paths(data_dir, manifest, split))
    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH_SIZE).prefetch(1)
    for encoded, labels, pixels in dataset:
        yield list(encoded.numpy()), labels.numpy(), pixels.numpy().astype(np.float32)


def file_size(path: str) -> int:
    """Bytes of a file, or of every file under a folder (a SavedModel)."""
    if not tf.io.gfile.isdir(path):
        return int(tf.io.gfile.stat(path).length)
    return sum(int(tf.io.gfile.stat(tf.io.gfile.join(folder, name)).length)
               for folder, _, names in tf.io.gfile.walk(path) for name in names)


def format_rows(rows: list[dict], split: str) -> str:
    """The rows as the text table appended to evaluation.txt (and used in the model card)."""
    lines = [f"exports on the {split} split ({rows[0]['num_examples']} images), each through its own runtime:", "",
             f"{'format':<22}{'accuracy':>10}{'agrees':>9}{'size MB':>10}  runtime"]
    for row in rows:
        flag = "  FLAGGED: below the SavedModel by more than the tolerance" if row["flagged"] else ""
        lines.append(f"{row['format']:<22}{row['accuracy']:>10.4f}{row['agreement_with_saved_model']:>9.4f}"
                     f"{row['size_bytes'] / 1e6:>10.2f}  {row['runtime']}{flag}")
    return "\n".join(lines) + "\n"


def add_to_report(*, output_dir: str, rows: list[dict], report: dict) -> None:
    """Adds the rows to evaluation.json ("exports") and evaluation.txt in output_dir (and to `report`)."""
    report["exports"] = rows
    schema.write_text(tf.io.gfile.join(output_dir, evaluation.EVALUATION_JSON), json.dumps(report, indent=2))
    text_path = tf.io.gfile.join(output_dir, evaluation.EVALUATION_TEXT)
    with tf.io.gfile.GFile(text_path) as file:
        text = file.read()
    schema.write_text(text_path, text.rstrip("\n") + "\n\n" + format_rows(rows, report["split"]))
