"""Labelling image files with an exported model, in batches, and writing the results (the work of
`python -m trainer.predict`): list the files, read them with a few threads, call a serving function per
batch, and write each batch's rows of a table, CSV or JSON before labelling the next, so memory does not grow
with the number of files and an output file fills as the run goes (under <output>.<random>.incomplete until finished).
The serving function is the SavedModel's `serving_default`, or the same contract around a TFLite or ONNX export
(load_serving): the files prepared as `serving_default` prepares them.

Each file is first made what the converter stores for training (read_image: tfrecords.writing.images.load_image, upright
8-bit RGB with transparent pixels on white), so every format is given the pixels training and evaluation read,
and a file the converter would skip is reported, in one line, before any TensorFlow decoder sees it.
"""

import concurrent.futures
import csv
import dataclasses
import fnmatch
import io
import json
import os
import posixpath
import time
import unicodedata
import uuid
from collections.abc import Iterable, Iterator
from typing import Self

import numpy as np
import tensorflow as tf

from tfrecords import schema
from tfrecords.writing import images
from trainer.exports import export
from trainer.input import data

LABELS_FILE = schema.LABELS_FILE
MODEL_FORMATS = ("saved_model", "tflite", "onnx")
OUTPUT_FORMATS = (".csv", ".json")
NOT_DECODABLE = "not a decodable image"
# Seconds between flushes of an output file on gs:// (or another remote filesystem), where a flush re-uploads it.
REMOTE_FLUSH_SECONDS = 300


FOLDER, FILE, GLOB, NOT_UTF8 = "folder", "file", "glob", "not UTF-8"
NOT_UTF8_REASON = "its name is not UTF-8 text (CSV, JSON and the table hold names as UTF-8); rename it"


@dataclasses.dataclass
class Listing:
    """What the PATH arguments label (list_inputs).

    files: the image files, in the arguments' order, each path once.
    folders: every folder walked, by its comparable path (links resolved), to the path it was reached by.
    globs: the arguments read as globs.
    skipped: files and folders not labelled, to the reason (reported like a file that cannot be read).
    warnings: what was left out on purpose (a link to a folder already listed), one line each.
    """

    files: list[str] = dataclasses.field(default_factory=list)
    folders: dict[str, str] = dataclasses.field(default_factory=dict)
    globs: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)


def argument_kind(path: str) -> str:
    """What a PATH argument means, the one decision list_inputs lists by and check_output_path refuses by: a FOLDER
    if it is one, else a FILE if it exists, else a GLOB (so 'photos[2024]' is the folder of that name when there is
    one); NOT_UTF8 for a local name whose bytes are not UTF-8 (given as surrogates, as Python gives them)."""
    if not _is_utf8(path):
        return NOT_UTF8
    if tf.io.gfile.isdir(path):
        return FOLDER
    return FILE if tf.io.gfile.exists(path) else GLOB


def list_inputs(paths: list[str]) -> Listing:
    """Expands folders and globs into files, keeping the arguments' order and listing each file once.

    A folder contributes its files recursively in sorted order, skipping hidden files and folders (names
    starting with "."), following links to folders but walking each real folder once (a link loop or a second
    link to a folder already walked is a warning); a glob contributes its sorted matches, hidden names skipped and
    matched folders expanded; a plain file is kept even when hidden. A name that is not UTF-8 is skipped with
    NOT_UTF8_REASON, the other files still listed.

    Args:
        paths: files, folders and globs, local or gs://.

    Raises:
        ValueError: a path matches nothing, or a folder holds no visible file.
    """
    listing = Listing()
    for path in paths:
        kind = argument_kind(path)
        if kind == NOT_UTF8:
            listing.skipped[path] = NOT_UTF8_REASON
        elif kind == FILE:
            listing.files.append(path)
        elif kind == FOLDER:
            if _comparable(path) not in listing.folders and not _walk(path, listing):
                raise ValueError(
                    f"folder '{printable(path)}' has no files (hidden ones are skipped); give a folder of images"
                )
        else:
            listing.globs.append(path)
            if not _list_glob(path, listing):
                raise ValueError(
                    f"'{printable(path)}' is neither a file, a folder nor a glob that matches anything; check the path"
                )
    listing.files = list(dict.fromkeys(listing.files))
    return listing


def list_images(paths: list[str]) -> list[str]:
    """The image files of list_inputs(paths)."""
    return list_inputs(paths).files


def _list_glob(pattern: str, listing: Listing) -> bool:
    """Adds a glob's matches to listing; False when it matches nothing."""
    matched = False
    for match in sorted(tf.io.gfile.glob(pattern)):
        if _base_name(match).startswith("."):
            continue
        if tf.io.gfile.isdir(match):
            matched = _comparable(match) in listing.folders or _walk(match, listing) or matched
        else:
            listing.files.append(match)
            matched = True
    return matched


def _walk(folder: str, listing: Listing) -> bool:
    """Adds the files under folder to listing, in sorted order, each real folder walked once; False if it holds
    no visible file (one skipped for its name counts as one)."""
    found, pending, num_skipped = [], [folder], len(listing.skipped)
    while pending:
        current = pending.pop()
        real = _comparable(current)
        if real in listing.folders:
            listing.warnings.append(f"{printable(current)}: skipped, a link to {printable(listing.folders[real])}, "
                                    "a folder already listed")
            continue
        listing.folders[real] = current
        try:
            names = _entries(current)
        except (OSError, tf.errors.OpError) as error:
            listing.skipped[current] = f"folder cannot be read ({getattr(error, 'strerror', None) or error})"
            continue
        for name in sorted(names, reverse=True):  # popped from the end: walked in sorted order
            path = tf.io.gfile.join(current, name)
            if name.startswith("."):
                continue
            if not _is_utf8(name):
                listing.skipped[path] = NOT_UTF8_REASON
            elif _is_folder(path):
                pending.append(path)
            else:
                found.append(path)
    listing.files.extend(sorted(found))
    return bool(found) or len(listing.skipped) > num_skipped


def _entries(folder: str) -> list[str]:
    """The names in a folder: locally through the operating system, which gives a name that is not UTF-8 with
    surrogates (tf.io.gfile fails on the whole folder), remotely through tf.io.gfile (without gs://'s "/")."""
    if "://" not in folder:
        return os.listdir(folder)
    return [name.rstrip("/") for name in tf.io.gfile.listdir(folder)]


def _is_folder(path: str) -> bool:
    return os.path.isdir(path) if "://" not in path else tf.io.gfile.isdir(path)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """`text` for one line of a terminal: the bytes of a name that is not UTF-8 (surrogates) escaped as "\\xff",
    control characters and line or paragraph separators as Python writes them ("\\n", "\\r", "\\x1b", "\\u2028"),
    the rest as it is. For display only: CSV and JSON keep names as they are."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(repr(character)[1:-1] if unicodedata.category(character) in ("Cc", "Zl", "Zp") else character
                   for character in text)


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


def check_output_format(path: str) -> None:
    """Raises ValueError unless `path` ends in one of OUTPUT_FORMATS."""
    if not path.lower().endswith(OUTPUT_FORMATS):
        raise ValueError(f"--output {path!r} must end in .csv or .json (e.g. --output=predictions.csv)")


def check_output_path(path: str, *, overwrite: bool, model_dir: str, listing: Listing) -> None:
    """Raises ValueError, before any file is labelled, when writing `path` could replace or add to something it must
    not.

    Refused: another extension than OUTPUT_FORMATS; a path inside `model_dir` (the run's own files, such as
    run.json, even with `overwrite`); a path among what `listing` labels, compared as list_inputs read each
    argument, links resolved: inside a folder walked (also one reached through a link), one of the files, or
    matching an argument read as a glob (or inside a folder that does); a folder; a path under a file; an existing
    file unless `overwrite`.

    Args:
        path: the --output value (local or gs://).
        overwrite: --overwrite: an existing file may be replaced (once every file is labelled).
        model_dir: the --model_dir predictions are made with.
        listing: list_inputs of the file, folder and glob arguments being labelled.
    """
    check_output_format(path)
    output = _comparable(path)
    if _is_within(output, _comparable(model_dir)):
        raise ValueError(f"--output {path!r} is inside --model_dir {model_dir!r}; write predictions outside the run, "
                         "whose files (run.json, labels.txt, ...) it must not replace")
    reason = _labelled_location(path, listing)
    if reason:
        raise ValueError(f"--output {path!r} {reason}; write predictions outside the images being labelled")
    if tf.io.gfile.isdir(path):
        raise ValueError(f"--output {path!r} is a folder; give a file, e.g. --output={path.rstrip('/')}/predictions.csv")
    folder = path.rpartition("/")[0]
    if folder and tf.io.gfile.exists(folder) and not tf.io.gfile.isdir(folder):
        raise ValueError(f"--output {path!r}: {folder!r} is a file, not a folder; give a path in a folder")
    if tf.io.gfile.exists(path) and not overwrite:
        raise ValueError(f"--output {path!r} already exists; pass --overwrite to replace it (it is replaced only once "
                         "every file is labelled) or give another path")


def _labelled_location(path: str, listing: Listing) -> str | None:
    """Why the output `path` lies among what `listing` labels, else None."""
    output = _comparable(path)
    ancestors = [output] + [output[:index] for index, character in enumerate(output) if character == "/" and index]
    for ancestor in ancestors:
        if ancestor in listing.folders:
            return f"is inside '{printable(listing.folders[ancestor])}', a folder being labelled"
    for pattern in listing.globs:
        # fnmatch's * also matches "/": a glob refuses a little more than it lists, never less.
        if any(fnmatch.fnmatchcase(candidate, _comparable(pattern)) for candidate in ancestors):
            return f"matches {pattern!r}, which is being labelled"
    if tf.io.gfile.exists(path):  # a file listed under another name (a link to it) would be labelled, then replaced
        for file in listing.files:
            if _comparable(file) == output:
                return f"is '{printable(file)}', a file being labelled"
    return None


def _comparable(path: str) -> str:
    """A path in one spelling: a local one absolute with its links resolved (so `./run` or a link to the
    model_dir is the model_dir), a remote one (gs://...) with "." and ".." and doubled or trailing "/" removed."""
    if "://" in path:
        scheme, _, rest = path.partition("://")
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.realpath(path)


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def format_csv_rows(results: list[dict]) -> str:
    """Per image: path, class_name, probability, top1_class_name, top1_probability, ... (one CSV line each)."""
    rows = []
    for result in results:
        row = [result["path"], result["class_name"], f"{result['probability']:.6f}"]
        for entry in result["top_k"]:
            row += [entry["class_name"], f"{entry['probability']:.6f}"]
        rows.append(row)
    return _csv_lines(rows)


def format_csv_header(top_k: int) -> str:
    """The CSV header line for results holding `top_k` entries each."""
    header = ["path", "class_name", "probability"]
    for rank in range(1, top_k + 1):
        header += [f"top{rank}_class_name", f"top{rank}_probability"]
    return _csv_lines([header])


def _csv_lines(rows: list[list[str]]) -> str:
    lines = []
    for row in rows:
        text = io.StringIO()
        # The writer quotes a field holding a character of its line terminator, not any other: with "\n" alone a
        # "\r" in a path or class name stayed bare and a reader split the row there. So rows are written ending
        # in "\r\n" (a "\r" or "\n" inside a field is quoted) and that ending is replaced by the files' "\n".
        csv.writer(text, lineterminator="\r\n").writerow(row)
        lines.append(text.getvalue()[:-2] + "\n")
    return "".join(lines)


def format_json_items(results: list[dict]) -> str:
    """The results as items of the JSON list `json.dumps(..., indent=2)` writes, without the brackets.

    Each item is indented one level and they are separated by ",\n", so the items of successive batches joined
    by ",\n" inside "[\n" and "\n]" are the text of one dump of all the results.
    """
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
    # Cut "[\n" and "\n]": what stays is exactly these items' text inside a longer list.
    return json.dumps(rounded, indent=2)[2:-2]


class PredictionFile:
    """Writes results batch by batch as CSV or JSON, chosen by the extension of `path` (local or gs://).

    Use it in a `with` block. The rows go to a temporary file of this run's own beside `path`,
    `<path>.<random>.incomplete` (created new, never through a file or link already there, so two runs never share
    one), as they come, and it becomes `path` when the block ends without an error: `path` only ever holds a
    finished file. Without `overwrite` that last step creates `path` only if it is still absent (a file that
    appeared during the run, e.g. another run's output, is refused with ValueError and kept); with it, `path` is
    replaced in one rename. A block that ends with an error (or whose last step fails) removes the temporary file
    and the folders it made, leaving `path` as it was; only a killed process can leave a temporary file. A missing
    parent folder is created. The finished file is the same whatever the batches: a CSV header row and one row
    per image, or one JSON list of {path, class_name, probability, top_k: [{class_name, probability}, ...]}.
    Check `path` first with check_output_path.
    """

    def __init__(self, path: str, *, overwrite: bool = False):
        check_output_format(path)
        self.path = path
        self.overwrite = overwrite
        self.temporary_path = None  # made by _open
        self.is_csv = path.lower().endswith(".csv")
        self.num_written = 0
        self.file = None
        self.last_flush = 0.0
        self.made_folders = []  # the missing parent folders _open made, outermost first

    def __enter__(self) -> Self:
        return self

    def write(self, results: list[dict]) -> None:
        """Appends the results (all with as many top-k entries as the first batch's) to the temporary file."""
        if not results:
            return
        if self.file is None:
            self._open()
            # The CSV header names the top-k columns, so it waits for the first results.
            self.file.write(format_csv_header(len(results[0]["top_k"])) if self.is_csv else "[\n")
        elif not self.is_csv:
            self.file.write(",\n")
        self.file.write(format_csv_rows(results) if self.is_csv else format_json_items(results))
        self.num_written += len(results)
        # Locally a flush is a cheap write(2) that makes the rows survive a crash. On gs:// and other object
        # stores it uploads the whole file again (objects cannot be appended to), so there it is spaced out.
        now = time.monotonic()
        if "://" not in self.path or now - self.last_flush >= REMOTE_FLUSH_SECONDS:
            self.file.flush()
            self.last_flush = now

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is not None:
            self._discard()
            return
        try:
            if self.file is None:
                self._open()
                self.file.write(format_csv_header(0) if self.is_csv else "[]\n")
            elif not self.is_csv:
                self.file.write("\n]\n")
            self.file.close()
            self._finish()
        except BaseException:
            self._discard()
            raise

    def _finish(self) -> None:
        """Makes the temporary file `path`: replacing it only with `overwrite`, else only while it is absent."""
        appeared = ValueError(
            f"--output {self.path!r} exists now but did not when this run started (another run's?); it was kept and "
            "these predictions discarded: pass --overwrite to replace it, or give another path"
        )
        if "://" in self.path:
            # An object store has no create-if-absent rename: checked just before, by name (ram:// takes any name
            # the temporary file's starts with for an existing one).
            folder, _, name = self.path.rpartition("/")
            if not self.overwrite and name in [entry.rstrip("/") for entry in tf.io.gfile.listdir(folder)]:
                raise appeared
            tf.io.gfile.rename(self.temporary_path, self.path, overwrite=True)
        elif self.overwrite:
            os.replace(self.temporary_path, self.path)
        else:
            self._create_if_absent(appeared)

    def _create_if_absent(self, appeared: ValueError) -> None:
        try:
            os.link(self.temporary_path, self.path)  # fails if `path` exists, whatever it is: never replaced
        except FileExistsError:
            raise appeared from None
        except OSError:  # a filesystem without hard links: claim the name (fails if taken), then rename onto it
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            except FileExistsError:
                raise appeared from None
            os.replace(self.temporary_path, self.path)
            return
        os.remove(self.temporary_path)

    def _open(self) -> None:
        folder = self.path.rpartition("/")[0]
        while folder and not tf.io.gfile.exists(folder):
            self.made_folders.insert(0, folder)
            folder = folder.rpartition("/")[0]
        if self.made_folders:
            tf.io.gfile.makedirs(self.made_folders[-1])
        # A name no other run picks (16 random hex digits), so two runs on one --output never share a file.
        temporary_path = f"{self.path}.{uuid.uuid4().hex[:16]}{schema.INCOMPLETE_SUFFIX}"
        if "://" in self.path:  # an object store has no links to write through
            self.file, self.temporary_path = tf.io.gfile.GFile(temporary_path, "w"), temporary_path
            return
        # O_EXCL: a new file, never through a file or link already there (mode 0o666 less the umask, as open() makes).
        descriptor = os.open(temporary_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.file, self.temporary_path = os.fdopen(descriptor, "w", encoding="utf-8", newline=""), temporary_path

    def _discard(self) -> None:
        """Closes and removes the temporary file, then the folders _open made if they are still empty."""
        if self.file is not None:
            self.file.close()
        if self.temporary_path and tf.io.gfile.exists(self.temporary_path):
            tf.io.gfile.remove(self.temporary_path)
        for folder in reversed(self.made_folders):
            if tf.io.gfile.isdir(folder) and not tf.io.gfile.listdir(folder):
                tf.io.gfile.rmtree(folder)


class PredictionTable:
    """Prints results as a table for the terminal, batch by batch: path, predicted class, its probability and
    the top-k classes, one line per image (control characters in names escaped: printable). Nothing is printed
    without results.

    The column widths come from all the paths and class names up front rather than from the rows (which are
    not kept), so the columns line up as the rows arrive.
    """

    def __init__(self, *, stream, paths: list[str], class_names: list[str]):
        self.stream = stream
        self.widths = [
            max(len("path"), max((len(printable(path)) for path in paths), default=0)),
            max(len("class_name"), max((len(printable(name)) for name in class_names), default=0)),
            len("probability"),
        ]
        self.header_printed = False

    def write(self, results: list[dict]) -> None:
        """Prints one line per result, after the header line before the first one."""
        if not results:
            return
        rows = [] if self.header_printed else [["path", "class_name", "probability", "top_k"]]
        for result in results:
            top = ", ".join(f"{printable(entry['class_name'])} {entry['probability']:.4f}" for entry in result["top_k"])
            rows.append([printable(result["path"]), printable(result["class_name"]), f"{result['probability']:.4f}",
                         top])
        lines = ["  ".join([*(cell.ljust(width) for cell, width in zip(row, self.widths)), row[3]]) for row in rows]
        self.stream.write("\n".join(lines) + "\n")
        # Piped, stdout is block-buffered: flushed per batch, the rows are out before the next batch is labelled.
        self.stream.flush()
        self.header_printed = True
