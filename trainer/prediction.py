"""Labelling image files with an exported model, in batches, and writing the results (the work of
`python -m trainer.predict`): list the files, read them with a few threads, call a serving function per
batch, format a table, CSV or JSON. The serving function is the SavedModel's `serving_default`, or the same
contract around a TFLite or ONNX export (load_serving): the files prepared as `serving_default` prepares them.
"""

import concurrent.futures
import csv
import io
import json

import numpy as np
import tensorflow as tf

from tfrecords import schema
from trainer import data, export

LABELS_FILE = schema.LABELS_FILE
MODEL_FORMATS = ("saved_model", "tflite", "onnx")
OUTPUT_FORMATS = (".csv", ".json")
NOT_DECODABLE = "not a decodable image"


def list_images(paths: list[str]) -> list[str]:
    """Expands folders and globs into files, keeping the arguments' order and listing each file once.

    A folder contributes its files recursively in sorted order, skipping hidden files and folders (names
    starting with "."); a glob contributes its sorted matches, hidden names skipped and matched folders
    expanded; a plain file is kept even when hidden.

    Args:
        paths: files, folders and globs, local or gs://.

    Returns:
        The image file paths.

    Raises:
        ValueError: a path matches nothing, or a folder holds no visible file.
    """
    files = []
    for path in paths:
        if tf.io.gfile.isdir(path):
            found = _list_folder(path)
            if not found:
                raise ValueError(f"folder {path!r} has no files (hidden ones are skipped); give a folder of images")
        elif tf.io.gfile.exists(path):
            found = [path]
        else:
            found = []
            for match in sorted(tf.io.gfile.glob(path)):
                if _base_name(match).startswith("."):
                    continue
                found.extend(_list_folder(match) if tf.io.gfile.isdir(match) else [match])
            if not found:
                raise ValueError(
                    f"{path!r} is neither a file, a folder nor a glob that matches anything; check the path"
                )
        files.extend(found)
    return list(dict.fromkeys(files))


def _list_folder(folder: str) -> list[str]:
    found = []
    for parent, subfolders, names in tf.io.gfile.walk(folder):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found.extend(tf.io.gfile.join(parent, name) for name in names if not name.startswith("."))
    return sorted(found)


def _base_name(path: str) -> str:
    return path.rstrip("/").rpartition("/")[2]


def read_class_names(model_dir: str) -> list[str]:
    """Reads <model_dir>/labels.txt: one class name per line, in label-id order."""
    class_names = schema.read_labels(model_dir)
    if class_names is None:
        raise ValueError(
            f"no {LABELS_FILE} in --model_dir {model_dir!r}; give the --model_dir of a finished "
            "`python -m trainer.train` run (it writes the class names there)"
        )
    if not class_names:
        raise ValueError(f"{tf.io.gfile.join(model_dir, LABELS_FILE)!r} is empty; expected one class name per line")
    return class_names


def load_serving(*, model_dir: str, model_format: str = "saved_model", tflite_kind: str = "float"):
    """A serving function of one of a run's exports: called with `image_bytes` (a string tensor of encoded images),
    it returns `probabilities`, `class_ids` and `class_names`, as the SavedModel's `serving_default` does.

    For "tflite" (the file of `tflite_kind`, see export.TFLITE_FILES) and "onnx", each file is prepared as
    `serving_default` prepares it (data.decode_and_resize to the export's input size) and the class names come
    from the labels file beside the export, so predict_files' name check compares two files.
    """
    if model_format not in MODEL_FORMATS:
        raise ValueError(f"--format={model_format!r} is not one of {MODEL_FORMATS}")
    if model_format == "saved_model":
        return export.load_serving_function(tf.io.gfile.join(model_dir, export.SAVED_MODEL_DIR))
    if model_format == "tflite":
        if tflite_kind not in export.TFLITE_FILES:
            raise ValueError(f"--tflite_kind={tflite_kind!r} is not one of {list(export.TFLITE_FILES)}")
        folder = tf.io.gfile.join(model_dir, export.TFLITE_DIR)
        interpreter = export.load_tflite_interpreter(tf.io.gfile.join(folder, export.TFLITE_FILES[tflite_kind]))
        image_size = int(interpreter.get_input_details()[0]["shape"][1])
        class_names = read_class_names(folder)

        def predict(pixels):
            return export.predict_tflite(interpreter=interpreter, images=pixels)
    else:
        from trainer import onnx_model

        session = onnx_model.load_onnx_session(tf.io.gfile.join(model_dir, onnx_model.ONNX_FILE))
        image_size = int(session.get_inputs()[0].shape[1])
        class_names = read_class_names(model_dir)

        def predict(pixels):
            return onnx_model.predict_onnx(session=session, images=pixels)

    def serve(image_bytes):
        pixels = np.stack([data.decode_and_resize(encoded, image_size).numpy() for encoded in tf.unstack(image_bytes)])
        probabilities = predict(pixels.astype(np.float32))
        class_ids = np.argmax(probabilities, axis=1)
        return {"probabilities": tf.constant(probabilities), "class_ids": tf.constant(class_ids),
                "class_names": tf.constant([class_names[class_id] for class_id in class_ids])}

    return serve


def read_file(path: str) -> bytes:
    """Returns a file's bytes (local or gs://)."""
    with tf.io.gfile.GFile(path, "rb") as file:
        return file.read()


def label_images(*, serve, encoded_images: list[bytes], class_names: list[str], top_k: int) -> list[dict]:
    """Runs the serving signature once on a batch of encoded images.

    Args:
        serve: the `serving_default` signature from export.load_serving_function, or load_serving's function.
        encoded_images: JPEG/PNG/GIF/BMP file contents.
        class_names: all class names in label-id order.
        top_k: how many classes to keep per image (at most len(class_names)).

    Returns:
        Per image, {"class_name", "probability", "top_k": [{"class_name", "probability"}, ...]}, the top-k
        sorted by decreasing probability, the first one being the predicted class.

    Raises:
        tf.errors.InvalidArgumentError: one of the images cannot be decoded.
        ValueError: the model's number of classes differs from len(class_names).
    """
    outputs = serve(image_bytes=tf.constant(encoded_images))
    probabilities = outputs["probabilities"].numpy()
    if probabilities.shape[-1] != len(class_names):
        raise ValueError(
            f"the model outputs {probabilities.shape[-1]} class probabilities but {LABELS_FILE} lists "
            f"{len(class_names)} class names ({class_names[:5]}...); use the {LABELS_FILE} of the same --model_dir"
        )
    # The SavedModel names its own predictions: a labels file of another run would rename them silently.
    for class_id, served_name in zip(outputs["class_ids"].numpy(), outputs["class_names"].numpy()):
        if served_name.decode("utf-8") != class_names[class_id]:
            raise ValueError(
                f"{LABELS_FILE} calls class {class_id} {class_names[class_id]!r} but the SavedModel calls it "
                f"{served_name.decode('utf-8')!r}; use the {LABELS_FILE} of the same --model_dir"
            )
    # Stable sort of the negated values: ties keep label-id order, as tf.argmax does in the signature.
    best_first = np.argsort(-probabilities, axis=-1, kind="stable")[:, :top_k]
    labelled = []
    for row, class_ids in zip(probabilities, best_first):
        top = [{"class_name": class_names[i], "probability": float(row[i])} for i in class_ids]
        labelled.append({"class_name": top[0]["class_name"], "probability": top[0]["probability"], "top_k": top})
    return labelled


def predict_files(
    *, serve, paths: list[str], class_names: list[str], top_k: int, batch_size: int, num_read_threads: int = 8
) -> tuple[list[dict], dict[str, str]]:
    """Labels image files a batch at a time, reading the next batch while the current one runs.

    A batch holding an undecodable file is labelled again one file at a time, so only that file is lost.

    Args:
        serve: the `serving_default` signature from export.load_serving_function, or load_serving's function.
        paths: image files (local or gs://), e.g. from list_images.
        class_names: all class names in label-id order, e.g. from read_class_names.
        top_k: classes kept per image, at least 1; values above len(class_names) are clipped.
        batch_size: files per signature call, at least 1.
        num_read_threads: files read concurrently (gs:// reads are latency bound).

    Returns:
        (results, failures): results in the order of `paths`, each {"path", "class_name", "probability",
        "top_k": [{"class_name", "probability"}, ...]}; failures maps each file that could not be read or
        decoded to the reason.

    Raises:
        ValueError: top_k, batch_size or num_read_threads is below 1, or class_names does not match the model.
    """
    if top_k < 1:
        raise ValueError(f"--top_k {top_k} must be at least 1")
    if batch_size < 1:
        raise ValueError(f"--batch_size {batch_size} must be at least 1")
    if num_read_threads < 1:
        raise ValueError(f"--num_read_threads {num_read_threads} must be at least 1")
    top_k = min(top_k, len(class_names))
    batches = [paths[start : start + batch_size] for start in range(0, len(paths), batch_size)]
    results, failures = [], {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=num_read_threads) as executor:
        pending = [executor.submit(read_file, path) for path in batches[0]] if batches else []
        for index, batch in enumerate(batches):
            reads = pending
            if index + 1 < len(batches):
                pending = [executor.submit(read_file, path) for path in batches[index + 1]]
            readable, encoded_images = [], []
            for path, read in zip(batch, reads):
                try:
                    encoded_images.append(read.result())
                    readable.append(path)
                except tf.errors.OpError as error:
                    failures[path] = f"cannot be read ({(error.message or type(error).__name__).splitlines()[0]})"
            if not readable:
                continue
            options = {"serve": serve, "class_names": class_names, "top_k": top_k}
            try:
                labelled = label_images(encoded_images=encoded_images, **options)
            except tf.errors.InvalidArgumentError:
                labelled = []
                for path, encoded in zip(readable, encoded_images):
                    try:
                        labelled += label_images(encoded_images=[encoded], **options)
                    except tf.errors.InvalidArgumentError:
                        failures[path] = NOT_DECODABLE
                        labelled.append(None)
            results += [{"path": path, **label} for path, label in zip(readable, labelled) if label is not None]
    return results, failures


def check_output_path(path: str) -> None:
    """Raises ValueError unless `path` ends in one of OUTPUT_FORMATS."""
    if not path.lower().endswith(OUTPUT_FORMATS):
        raise ValueError(f"--output {path!r} must end in .csv or .json (e.g. --output=predictions.csv)")


def format_csv(results: list[dict]) -> str:
    """One header row, then per image: path, class_name, probability, top1_class_name, top1_probability, ..."""
    depth = max((len(result["top_k"]) for result in results), default=0)
    header = ["path", "class_name", "probability"]
    for rank in range(1, depth + 1):
        header += [f"top{rank}_class_name", f"top{rank}_probability"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for result in results:
        row = [result["path"], result["class_name"], f"{result['probability']:.6f}"]
        for entry in result["top_k"]:
            row += [entry["class_name"], f"{entry['probability']:.6f}"]
        writer.writerow(row)
    return text.getvalue()


def format_json(results: list[dict]) -> str:
    """A JSON list of {path, class_name, probability, top_k: [{class_name, probability}, ...]}."""
    rounded = [
        {
            "path": result["path"],
            "class_name": result["class_name"],
            "probability": round(result["probability"], 6),
            "top_k": [
                {"class_name": entry["class_name"], "probability": round(entry["probability"], 6)}
                for entry in result["top_k"]
            ],
        }
        for result in results
    ]
    return json.dumps(rounded, indent=2) + "\n"


def write_predictions(*, results: list[dict], path: str) -> None:
    """Writes results as CSV or JSON, chosen by the extension of `path` (local or gs://).

    The file is written under a temporary name and then renamed, so an interrupted run never leaves a
    half-written file under `path`; a missing parent folder is created.
    """
    check_output_path(path)
    text = format_csv(results) if path.lower().endswith(".csv") else format_json(results)
    folder = path.rpartition("/")[0]
    if folder and not tf.io.gfile.isdir(folder):
        tf.io.gfile.makedirs(folder)
    temporary = path + ".incomplete"
    with tf.io.gfile.GFile(temporary, "w") as file:
        file.write(text)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def format_table(results: list[dict]) -> str:
    """A table for the terminal: path, predicted class, its probability and the top-k classes."""
    if not results:
        return ""
    rows = [["path", "class_name", "probability", "top_k"]]
    for result in results:
        top = ", ".join(f"{entry['class_name']} {entry['probability']:.4f}" for entry in result["top_k"])
        rows.append([result["path"], result["class_name"], f"{result['probability']:.4f}", top])
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = ["  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[3]]) for row in rows]
    return "\n".join(lines) + "\n"
