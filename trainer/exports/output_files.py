"""Where and how `python -m trainer.predict` writes its results: the checks of --output before any file is
labelled (never into the model_dir or among the images being labelled, never over a file without --overwrite), the
CSV and JSON text of each batch, the file that fills batch by batch under a temporary name of its own
(PredictionFile) and the table printed when there is no --output (PredictionTable).
"""

import csv
import fnmatch
import io
import json
import os
import time
import uuid
from typing import Self

import tensorflow as tf

from tfrecords import schema
from trainer.exports import listing

OUTPUT_FORMATS = (".csv", ".json")


# Seconds between flushes of an output file on gs:// (or another remote filesystem), where a flush re-uploads it.
REMOTE_FLUSH_SECONDS = 300


def check_output_format(path: str) -> None:
    """Raises ValueError unless `path` ends in one of OUTPUT_FORMATS."""
    if not path.lower().endswith(OUTPUT_FORMATS):
        raise ValueError(f"--output {path!r} must end in .csv or .json (e.g. --output=predictions.csv)")


def check_output_path(path: str, *, overwrite: bool, model_dir: str, listed: listing.Listing) -> None:
    """Raises ValueError, before any file is labelled, when writing `path` could replace or add to something it must
    not.

    Refused: another extension than OUTPUT_FORMATS; a path inside `model_dir` (the run's own files, such as
    run.json, even with `overwrite`); a path among what `listed` labels, compared as list_inputs read each
    argument, links resolved: inside a folder walked (also one reached through a link), one of the files, or
    matching an argument read as a glob (or inside a folder that does); a folder; a path under a file; an existing
    file unless `overwrite`.

    Args:
        path: the --output value (local or gs://).
        overwrite: --overwrite: an existing file may be replaced (once every file is labelled).
        model_dir: the --model_dir predictions are made with.
        listed: list_inputs of the file, folder and glob arguments being labelled.
    """
    check_output_format(path)
    output = listing.comparable_path(path)
    if _is_within(output, listing.comparable_path(model_dir)):
        raise ValueError(f"--output {path!r} is inside --model_dir {model_dir!r}; write predictions outside the run, "
                         "whose files (run.json, labels.txt, ...) it must not replace")
    reason = _labelled_location(path, listed)
    if reason:
        raise ValueError(f"--output {path!r} {reason}; write predictions outside the images being labelled")
    if tf.io.gfile.isdir(path):
        raise ValueError(
            f"--output {path!r} is a folder; give a file, e.g. --output={path.rstrip('/')}/predictions.csv")
    folder = path.rpartition("/")[0]
    if folder and tf.io.gfile.exists(folder) and not tf.io.gfile.isdir(folder):
        raise ValueError(f"--output {path!r}: {folder!r} is a file, not a folder; give a path in a folder")
    if tf.io.gfile.exists(path) and not overwrite:
        raise ValueError(f"--output {path!r} already exists; pass --overwrite to replace it (it is replaced only once "
                         "every file is labelled) or give another path")


def _labelled_location(path: str, listed: listing.Listing) -> str | None:
    """Why the output `path` lies among what `listed` labels, else None."""
    output = listing.comparable_path(path)
    ancestors = [output] + [output[:index] for index, character in enumerate(output) if character == "/" and index]
    for ancestor in ancestors:
        if ancestor in listed.folders:
            return f"is inside '{listing.printable(listed.folders[ancestor])}', a folder being labelled"
    for pattern in listed.globs:
        # fnmatch's * also matches "/": a glob refuses a little more than it lists, never less.
        if any(fnmatch.fnmatchcase(candidate, listing.comparable_path(pattern)) for candidate in ancestors):
            return f"matches {pattern!r}, which is being labelled"
    if tf.io.gfile.exists(path):  # a file listed under another name (a link to it) would be labelled, then replaced
        for file in listed.files:
            if listing.comparable_path(file) == output:
                return f"is '{listing.printable(file)}', a file being labelled"
    return None


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
            max(len("path"), max((len(listing.printable(path)) for path in paths), default=0)),
            max(len("class_name"), max((len(listing.printable(name)) for name in class_names), default=0)),
            len("probability"),
        ]
        self.header_printed = False

    def write(self, results: list[dict]) -> None:
        """Prints one line per result, after the header line before the first one."""
        if not results:
            return
        rows = [] if self.header_printed else [["path", "class_name", "probability", "top_k"]]
        for result in results:
            top = ", ".join(
                f"{listing.printable(entry['class_name'])} {entry['probability']:.4f}" for entry in result["top_k"])
            rows.append([listing.printable(result["path"]), listing.printable(result["class_name"]),
                         f"{result['probability']:.4f}", top])
        lines = ["  ".join([*(cell.ljust(width) for cell, width in zip(row, self.widths)), row[3]]) for row in rows]
        self.stream.write("\n".join(lines) + "\n")
        # Piped, stdout is block-buffered: flushed per batch, the rows are out before the next batch is labelled.
        self.stream.flush()
        self.header_printed = True

