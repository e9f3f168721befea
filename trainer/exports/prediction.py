"""Labelling image files with an exported model, in batches (the work of `python -m trainer.predict`): read the
files with a few threads, call a serving function per batch, and hand each batch's results on (write_batches) before
labelling the next, so memory does not grow with the number of files. Which files the arguments name is
trainer/exports/listing.py; where and how results are written, trainer/exports/output_files.py.
The serving function is the SavedModel's `serving_default`, or the same contract around a TFLite or ONNX export
(load_serving): the files prepared as `serving_default` prepares them.

Each file is first made what the converter stores for training (read_image: tfrecords.writing.images.load_image, upright
8-bit RGB with transparent pixels on white), so every format is given the pixels training and evaluation read,
and a file the converter would skip is reported, in one line, before any TensorFlow decoder sees it.
"""

import concurrent.futures
from collections.abc import Iterable, Iterator

import numpy as np
import tensorflow as tf

from tfrecords import schema
from tfrecords.writing import images
from trainer.exports import export
from trainer.input import data

LABELS_FILE = schema.LABELS_FILE
MODEL_FORMATS = ("saved_model", "tflite", "onnx")
NOT_DECODABLE = "not a decodable image"


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


def load_serving(*, model_dir: str, class_names: list[str], model_format: str = "saved_model",
                 tflite_kind: str = "float"):
    """A serving function of one of a run's exports: called with `image_bytes` (a string tensor of encoded images),
    it returns `probabilities`, `class_ids` and `class_names`, and `top_k_*`, as the SavedModel's `serving_default`
    does.

    For "tflite" (the file of `tflite_kind`, see export.TFLITE_FILES) and "onnx", each file is prepared as
    `serving_default` prepares it (data.decode_and_resize to the export's input size), `top_k_*` lists every class,
    and the names are the export's own: tflite/labels.txt beside the TFLite file, the class names model.onnx
    carries. `class_names_source` says which, so check_class_names names the file that disagrees.

    Before anything is labelled, `class_names` (labels.txt) are compared in full, in order, with the names of the
    export that runs (check_same_class_names): the SavedModel's list of every class (its signature names only the
    top-k), model.onnx's, tflite/labels.txt. A .tflite file carries no names, so tflite/labels.txt is also compared
    with the SavedModel's: a labels.txt and a tflite/labels.txt reordered alike are refused, and without a
    saved_model/ to check them against the TFLite file is not run.

    Raises:
        ValueError: an unknown format, a missing export, or class names that disagree with the export's or the run's.
    """
    if model_format not in MODEL_FORMATS:
        raise ValueError(f"--format={model_format!r} is not one of {MODEL_FORMATS}")
    saved_model_dir = tf.io.gfile.join(model_dir, export.SAVED_MODEL_DIR)
    if model_format == "saved_model":
        serve = export.load_serving_function(saved_model_dir)
        check_same_class_names(class_names, _run_class_names(saved_model_dir), "the SavedModel")
        return serve
    if model_format == "tflite":
        predict, image_size, export_names, source = _load_tflite(model_dir, tflite_kind)
        check_same_class_names(class_names, export_names, source)
        check_same_class_names(class_names, _run_class_names(saved_model_dir), "the SavedModel")
    else:
        predict, image_size, export_names, source = _load_onnx(model_dir)
        check_same_class_names(class_names, export_names, source)

    def serve(image_bytes):
        pixels = np.stack([data.decode_and_resize(encoded, image_size).numpy() for encoded in tf.unstack(image_bytes)])
        probabilities = predict(pixels.astype(np.float32))
        # Stable sort of the negated values: ties keep label-id order, as tf.argmax does in the signature.
        best_first = np.argsort(-probabilities, axis=1, kind="stable")
        names = np.array(export_names, dtype=object)
        return {"probabilities": tf.constant(probabilities), "class_ids": tf.constant(best_first[:, 0]),
                "class_names": tf.constant(names[best_first[:, 0]]), "top_k_class_ids": tf.constant(best_first),
                "top_k_class_names": tf.constant(names[best_first]), "class_names_source": source}

    return serve


def _run_class_names(saved_model_dir: str) -> list[str]:
    """The run's own list of every class name: the one its SavedModel gathers its names from."""
    names = export.read_saved_model_class_names(saved_model_dir)
    if names is None:
        raise ValueError(
            f"no SavedModel with its class names in {saved_model_dir!r}, so the {LABELS_FILE} files could not be "
            "checked against the run's own class names; give the --model_dir of a finished `python -m trainer.train` "
            "run with its saved_model/ folder as it wrote it"
        )
    return names


def check_same_class_names(class_names: list[str], own_names: list[str], source: str) -> None:
    """Raises ValueError unless `class_names` (labels.txt) are `own_names`, all of them in the same order.

    Args:
        class_names: the names predict prints, from labels.txt.
        own_names: the names of an export or of the run, in label-id order.
        source: where `own_names` are, for the message ("the SavedModel", "tflite/labels.txt", "model.onnx").
    """
    if len(class_names) != len(own_names):
        raise ValueError(
            f"{LABELS_FILE} lists {len(class_names)} class names but {source} has {len(own_names)}; the two must "
            f"come from the same training run: use its {LABELS_FILE} and exports as it wrote them"
        )
    for class_id, (name, own_name) in enumerate(zip(class_names, own_names)):
        if name != own_name:
            raise ValueError(_disagreement(class_id, name, own_name, source))


def _disagreement(class_id: int, name: str, own_name: str, source: str) -> str:
    return (f"{LABELS_FILE} calls class {class_id} {name!r} but {source} calls it {own_name!r}; the two must come "
            f"from the same training run: use its {LABELS_FILE} and exports as it wrote them")


def _load_tflite(model_dir: str, tflite_kind: str):
    """(predict(pixels) -> probabilities, image size, class names, where the names are) of a run's TFLite file."""
    if tflite_kind not in export.TFLITE_FILES:
        raise ValueError(f"--tflite_kind={tflite_kind!r} is not one of {list(export.TFLITE_FILES)}")
    folder = tf.io.gfile.join(model_dir, export.TFLITE_DIR)
    path = tf.io.gfile.join(folder, export.TFLITE_FILES[tflite_kind])
    if not tf.io.gfile.exists(path):
        raise ValueError(f"no TFLite model at {path!r}; train with --export_tflite={tflite_kind} to write it")
    class_names = schema.read_labels(folder)
    if not class_names:
        raise ValueError(f"no {LABELS_FILE} beside {path!r} (or it is empty): the TFLite file's class names are kept "
                         f"there; train with --export_tflite={tflite_kind} again to write both")
    interpreter = export.load_tflite_interpreter(path)
    image_size = int(interpreter.get_input_details()[0]["shape"][1])
    return (lambda pixels: export.predict_tflite(interpreter=interpreter, images=pixels), image_size, class_names,
            f"{export.TFLITE_DIR}/{LABELS_FILE}")


def _load_onnx(model_dir: str):
    """(predict(pixels) -> probabilities, image size, class names, where the names are) of a run's model.onnx."""
    from trainer.exports import onnx_model  # the onnx extra: imported only when an ONNX file is read

    path = tf.io.gfile.join(model_dir, onnx_model.ONNX_FILE)
    session = onnx_model.load_onnx_session(path)
    class_names = onnx_model.class_names(session)
    if class_names is None:
        raise ValueError(
            f"{path!r} carries no class names (it was written before model.onnx stored them), so the names printed "
            "could not be checked against it; re-export it: run the same `python -m trainer.train` command with "
            "--export_onnx again (a finished run is not retrained, only evaluated and exported)"
        )
    image_size = int(session.get_inputs()[0].shape[1])
    return (lambda pixels: onnx_model.predict_onnx(session=session, images=pixels), image_size, class_names,
            onnx_model.ONNX_FILE)


def check_class_names(outputs: dict, class_names: list[str]) -> None:
    """The check, per batch, of the names predict prints, for every format: raises ValueError when the model names a
    class it returned (its top class or one of its top-k) otherwise than labels.txt does. (load_serving has already
    compared every name, before the first batch.)

    A labels.txt of another run, or reordered, would otherwise rename predictions silently. The SavedModel names
    its classes itself (the names are in its graph); load_serving's functions name theirs from the export's own
    names and say where those are (`class_names_source`).
    """
    source = outputs.get("class_names_source", "the SavedModel")
    pairs = list(zip(outputs["class_ids"].numpy(), outputs["class_names"].numpy()))
    if "top_k_class_ids" in outputs:  # absent only from SavedModels of the first exports
        pairs += zip(outputs["top_k_class_ids"].numpy().ravel(), outputs["top_k_class_names"].numpy().ravel())
    for class_id, served_name in pairs:
        if served_name.decode("utf-8") != class_names[class_id]:
            raise ValueError(_disagreement(class_id, class_names[class_id], served_name.decode("utf-8"), source))


def read_file(path: str) -> bytes:
    """Returns a file's bytes (local or gs://)."""
    with tf.io.gfile.GFile(path, "rb") as file:
        return file.read()


def read_image(path: str) -> bytes:
    """A file's bytes as the converter stores them for training (tfrecords.writing.images.load_image, at full size): an
    upright RGB JPEG kept byte for byte, anything else (PNG, transparency, grey, 16-bit, palette, EXIF-rotated,
    CMYK, WebP, ...) decoded, normalised and re-encoded as JPEG.

    Pillow decodes it, which prints nothing: TensorFlow's decoders print their own lines for a broken file (libjpeg
    straight to stderr), and now only see files that decode.

    Raises:
        tf.errors.OpError: the file cannot be read.
        tfrecords.writing.images.ImageError: the converter would skip it (not an image, truncated, corrupt, ...).
    """
    return images.load_image(read_file(path))[0]


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
        ValueError: the model's number of classes differs from len(class_names), or it names a class otherwise
            (check_class_names).
    """
    outputs = serve(image_bytes=tf.constant(encoded_images))
    probabilities = outputs["probabilities"].numpy()
    if probabilities.shape[-1] != len(class_names):
        raise ValueError(
            f"the model outputs {probabilities.shape[-1]} class probabilities but {LABELS_FILE} lists "
            f"{len(class_names)} class names ({class_names[:5]}...); use the {LABELS_FILE} of the same --model_dir"
        )
    check_class_names(outputs, class_names)
    # Stable sort of the negated values: ties keep label-id order, as tf.argmax does in the signature.
    best_first = np.argsort(-probabilities, axis=-1, kind="stable")[:, :top_k]
    labelled = []
    for row, class_ids in zip(probabilities, best_first):
        top = [{"class_name": class_names[i], "probability": float(row[i])} for i in class_ids]
        labelled.append({"class_name": top[0]["class_name"], "probability": top[0]["probability"], "top_k": top})
    return labelled


def predict_batches(
    *, serve, paths: list[str], class_names: list[str], top_k: int, batch_size: int, num_read_threads: int = 8
) -> Iterator[tuple[list[dict], dict[str, str]]]:
    """Labels image files a batch at a time, reading the next batch while the current one runs.

    A generator, so a caller writes each batch out before the next one is labelled and holds no more than a
    batch of results however many files there are. The reading threads prepare each file as the converter
    stores it (read_image), so a file that is no image fails there; should the model still fail to decode one, its
    batch is labelled again one file at a time, so only that file is lost.

    Args:
        serve: the `serving_default` signature from export.load_serving_function, or load_serving's function.
        paths: image files (local or gs://), e.g. from list_images.
        class_names: all class names in label-id order, e.g. from read_class_names.
        top_k: classes kept per image, at least 1; values above len(class_names) are clipped.
        batch_size: files per signature call, at least 1.
        num_read_threads: files read concurrently (gs:// reads are latency bound).

    Yields:
        Per batch of `paths`, in order, (results, failures): results in the order of the batch's paths, each
        {"path", "class_name", "probability", "top_k": [{"class_name", "probability"}, ...]} with the same number
        of top-k entries; failures maps each of the batch's files that could not be read or decoded to the reason.

    Raises:
        ValueError (when iterated): top_k, batch_size or num_read_threads is below 1, or class_names does not
        match the model.
    """
    if top_k < 1:
        raise ValueError(f"--top_k {top_k} must be at least 1")
    if batch_size < 1:
        raise ValueError(f"--batch_size {batch_size} must be at least 1")
    if num_read_threads < 1:
        raise ValueError(f"--num_read_threads {num_read_threads} must be at least 1")
    options = {"serve": serve, "class_names": class_names, "top_k": min(top_k, len(class_names))}
    # Batches are sliced as they are reached rather than all up front: a list of them would be one more
    # reference per file.
    with concurrent.futures.ThreadPoolExecutor(max_workers=num_read_threads) as executor:
        pending = [executor.submit(read_image, path) for path in paths[:batch_size]]
        for start in range(0, len(paths), batch_size):
            batch, reads = paths[start : start + batch_size], pending
            pending = [executor.submit(read_image, path) for path in paths[start + batch_size : start + 2 * batch_size]]
            failures, readable, encoded_images = {}, [], []
            for path, read in zip(batch, reads):
                try:
                    encoded_images.append(read.result())
                    readable.append(path)
                except tf.errors.OpError as error:
                    failures[path] = f"cannot be read ({(error.message or type(error).__name__).splitlines()[0]})"
                except images.ImageError:
                    failures[path] = NOT_DECODABLE
            if not readable:
                yield [], failures
                continue
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
            yield [{"path": path, **label} for path, label in zip(readable, labelled) if label is not None], failures


def predict_files(
    *, serve, paths: list[str], class_names: list[str], top_k: int, batch_size: int, num_read_threads: int = 8
) -> tuple[list[dict], dict[str, str]]:
    """All of predict_batches' results and failures at once, for a list of files small enough to hold them.

    Returns:
        (results, failures): results in the order of `paths`; failures maps each file that could not be read
        or decoded to the reason.
    """
    results, failures = [], {}
    for batch_results, batch_failures in predict_batches(
        serve=serve, paths=paths, class_names=class_names, top_k=top_k, batch_size=batch_size,
        num_read_threads=num_read_threads,
    ):
        results += batch_results
        failures.update(batch_failures)
    return results, failures


def write_batches(*, batches: Iterable[tuple[list[dict], dict[str, str]]], output) -> tuple[int, dict[str, str]]:
    """Hands each batch of results to `output` as it comes, keeping only the failures.

    Args:
        batches: (results, failures) per batch, from predict_batches.
        output: a PredictionFile (inside its `with` block) or a PredictionTable.

    Returns:
        (num_labelled, failures): how many results were written, and every failed file with its reason.
    """
    num_labelled, failures = 0, {}
    for results, batch_failures in batches:
        output.write(results)
        num_labelled += len(results)
        failures.update(batch_failures)
    return num_labelled, failures


