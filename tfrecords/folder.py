"""Lists an image folder: which files there are, their class, and their split.

Two layouts are accepted:

    class_folders   <input_dir>/<class>/<files>              files may be nested deeper in a class folder
    pre_split       <input_dir>/train/<class>/<files>
                    <input_dir>/validation/<class>/<files>   (or val/)
                    <input_dir>/test/<class>/<files>         (optional)

The pre-split layout (like cats_and_dogs_filtered) is detected when both a `train` folder and a
`validation` or `val` folder exist; its splits are kept as given. In the class-folder layout each file
gets a split from a hash of the seed and its relative path, so a file keeps its split whatever the
listing order, and adding files never moves the others.

With `labels_csv`, the files are the `path,label` rows of that CSV instead (paths relative to
input_dir, which need not be class folders), split by the same hash as class folders.

Class names must be usable as label names: a name with a line break or another control character is
refused (labels.txt has one name per line). Any other name, including spaces, non-ASCII letters and
characters that are awkward in paths, is kept as it is: it is only stored, never used as a path.

Ignored on purpose: hidden files and folders (names starting with "."; e.g. .DS_Store, .ipynb_checkpoints),
`__MACOSX` folders (debris of zips made on macOS), and plain files at the top level (LICENSE.txt,
README). Every other regular file inside a class folder is a candidate: its format is detected from its
bytes later (`tfrecords.images`), not from its extension, and files that are not images are skipped then.

All paths go through tf.io.gfile, so input_dir may be local or gs://.
"""

import csv
import dataclasses
import hashlib
import io

from absl import logging
import tensorflow as tf

LAYOUT_CLASS_FOLDERS = "class_folders"
LAYOUT_PRE_SPLIT = "pre_split"
LAYOUT_LABELS_CSV = "labels_csv"
CSV_HEADER = ["path", "label"]
TRAIN_FOLDER = "train"
VALIDATION_FOLDERS = ("validation", "val")
TEST_FOLDER = "test"
IGNORED_NAMES = ("__MACOSX",)


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One candidate image file.

    Attributes:
        path: full path to read the file from (input_dir joined with relative_path).
        relative_path: path relative to input_dir, with "/" separators; stored in each example.
        class_name: name of the class folder.
        label: index of class_name in the sorted class names.
        split: one of schema.SPLITS.
    """

    path: str
    relative_path: str
    class_name: str
    label: int
    split: str


@dataclasses.dataclass(frozen=True)
class Listing:
    """Everything found in an input folder.

    Attributes:
        layout: LAYOUT_CLASS_FOLDERS or LAYOUT_PRE_SPLIT.
        classes: sorted class names; the label id of a class is its index.
        files: all candidate files, sorted by relative_path.
    """

    layout: str
    classes: list[str]
    files: list[SourceFile]


def stable_fraction(*, seed: int, relative_path: str) -> float:
    """Returns a number in [0, 1) that depends only on the seed and the path.

    Python's hash() is salted per process, so it would give a different split on every run.
    """
    digest = hashlib.sha256(f"{seed}:{relative_path}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(*, relative_path: str, seed: int, validation_fraction: float, test_fraction: float) -> str:
    """Returns the split ("train", "validation" or "test") of one file in the class-folder layout."""
    fraction = stable_fraction(seed=seed, relative_path=relative_path)
    if fraction < test_fraction:
        return "test"
    if fraction < test_fraction + validation_fraction:
        return "validation"
    return "train"


def list_images(
    *, input_dir: str, validation_fraction: float, test_fraction: float, seed: int, labels_csv: str | None = None
) -> Listing:
    """Lists the candidate image files of input_dir, with class, label and split.

    Args:
        input_dir: local or gs:// folder in one of the two layouts of this module's docstring.
        validation_fraction: share of files for validation (class-folder layout only).
        test_fraction: share of files for test (class-folder layout only).
        seed: seed of the split assignment (class-folder layout only).
        labels_csv: optional CSV of path,label rows; replaces the folder layouts.

    Returns:
        A Listing.

    Raises:
        ValueError: the folder is missing, has fewer than two classes or no files, or the fractions
            are out of range.
    """
    _check_fractions(validation_fraction=validation_fraction, test_fraction=test_fraction)
    if not tf.io.gfile.isdir(input_dir):
        raise ValueError(
            f"--input_dir {input_dir!r} does not exist or is not a folder; "
            "expected <input_dir>/<class>/<image files>"
        )
    if labels_csv:
        return _list_labels_csv(
            input_dir=input_dir, labels_csv=labels_csv, validation_fraction=validation_fraction,
            test_fraction=test_fraction, seed=seed,
        )
    top_folders = _subfolders(input_dir)
    validation_folders = [name for name in VALIDATION_FOLDERS if name in top_folders]
    if TRAIN_FOLDER in top_folders and validation_folders:
        if len(validation_folders) > 1:
            raise ValueError(
                f"--input_dir {input_dir!r} has both 'validation' and 'val' folders; keep only one"
            )
        split_folders = {"train": TRAIN_FOLDER, "validation": validation_folders[0]}
        if TEST_FOLDER in top_folders:
            split_folders["test"] = TEST_FOLDER
        for name in sorted(set(top_folders) - set(split_folders.values())):
            logging.warning("Ignoring folder %r of pre-split --input_dir %r", name, input_dir)
        return _list_pre_split(input_dir=input_dir, split_folders=split_folders)
    return _list_class_folders(
        input_dir=input_dir,
        class_names=top_folders,
        validation_fraction=validation_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )


def _check_fractions(*, validation_fraction: float, test_fraction: float) -> None:
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if value < 0:
            raise ValueError(f"--{name}={value} is negative; use a fraction in [0, 1), e.g. 0.2")
    if validation_fraction + test_fraction >= 1:
        raise ValueError(
            f"--validation_fraction={validation_fraction} plus --test_fraction={test_fraction} is "
            f"{validation_fraction + test_fraction:g}, which leaves nothing for training; "
            "make their sum less than 1 (e.g. 0.2 and 0.1)"
        )


def _list_class_folders(
    *, input_dir: str, class_names: list, validation_fraction: float, test_fraction: float, seed: int
) -> Listing:
    _check_classes(class_names=class_names, input_dir=input_dir)
    files = []
    for label, class_name in enumerate(class_names):
        for relative_path in _files_under(input_dir, class_name):
            split = assign_split(
                relative_path=relative_path,
                seed=seed,
                validation_fraction=validation_fraction,
                test_fraction=test_fraction,
            )
            files.append(_source_file(input_dir, relative_path, class_name, label, split))
    _check_has_files(files=files, input_dir=input_dir)
    return Listing(
        layout=LAYOUT_CLASS_FOLDERS, classes=class_names, files=sorted(files, key=_by_path)
    )


def _list_pre_split(*, input_dir: str, split_folders: dict) -> Listing:
    classes_by_split = {}
    for split, split_folder in split_folders.items():
        classes_by_split[split] = _subfolders(tf.io.gfile.join(input_dir, split_folder))
        if not classes_by_split[split]:
            raise ValueError(
                f"--input_dir {input_dir!r} looks pre-split but {split_folder + '/'!r} has no class "
                f"subfolders; expected <input_dir>/{split_folder}/<class>/<image files>"
            )
    class_names = sorted(set().union(*classes_by_split.values()))
    _check_classes(class_names=class_names, input_dir=input_dir)
    files = []
    for split, split_folder in split_folders.items():
        for class_name in classes_by_split[split]:
            label = class_names.index(class_name)
            for relative_path in _files_under(input_dir, f"{split_folder}/{class_name}"):
                files.append(_source_file(input_dir, relative_path, class_name, label, split))
    _check_has_files(files=files, input_dir=input_dir)
    return Listing(layout=LAYOUT_PRE_SPLIT, classes=class_names, files=sorted(files, key=_by_path))


def _list_labels_csv(
    *, input_dir: str, labels_csv: str, validation_fraction: float, test_fraction: float, seed: int
) -> Listing:
    if not tf.io.gfile.exists(labels_csv):
        raise ValueError(f"--labels_csv {labels_csv!r} does not exist; expected a CSV of path,label rows")
    with tf.io.gfile.GFile(labels_csv, "r") as csv_file:
        rows = [row for row in csv.reader(io.StringIO(csv_file.read())) if row]
    if rows and [cell.strip() for cell in rows[0]] == CSV_HEADER:
        rows = rows[1:]
    labels_by_path = {}
    for line_number, row in enumerate(rows, start=1):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"--labels_csv {labels_csv!r} row {line_number} is {row!r}; expected path,label")
        relative_path, label_name = row[0].strip(), row[1].strip()
        if relative_path.startswith("/") or ".." in relative_path.split("/"):
            raise ValueError(
                f"--labels_csv {labels_csv!r} row {line_number} path {relative_path!r} leaves --input_dir; "
                "use paths relative to --input_dir"
            )
        if labels_by_path.setdefault(relative_path, label_name) != label_name:
            raise ValueError(
                f"--labels_csv {labels_csv!r} gives {relative_path!r} two labels "
                f"({labels_by_path[relative_path]!r} and {label_name!r}); keep one"
            )
    class_names = sorted(set(labels_by_path.values()))
    _check_classes(class_names=class_names, input_dir=input_dir)
    files = []
    for relative_path, class_name in labels_by_path.items():
        split = assign_split(
            relative_path=relative_path, seed=seed, validation_fraction=validation_fraction,
            test_fraction=test_fraction,
        )
        files.append(_source_file(input_dir, relative_path, class_name, class_names.index(class_name), split))
    return Listing(layout=LAYOUT_LABELS_CSV, classes=class_names, files=sorted(files, key=_by_path))


def _check_classes(*, class_names: list, input_dir: str) -> None:
    for name in class_names:
        if any(not character.isprintable() for character in name):
            raise ValueError(
                f"--input_dir {input_dir!r} has a class named {name!r}, with a line break or control "
                "character; rename it (labels.txt holds one class name per line)"
            )
    if not class_names:
        raise ValueError(
            f"--input_dir {input_dir!r} has no class subfolders; expected <input_dir>/<class>/<image files>"
        )
    if len(class_names) == 1:
        raise ValueError(
            f"--input_dir {input_dir!r} has only one class folder ({class_names[0]!r}); a classifier needs "
            "at least two: <input_dir>/<class>/<image files>"
        )


def _check_has_files(*, files: list, input_dir: str) -> None:
    if not files:
        raise ValueError(
            f"--input_dir {input_dir!r} has class folders but no files in them; "
            "expected <input_dir>/<class>/<image files>"
        )


def _source_file(input_dir: str, relative_path: str, class_name: str, label: int, split: str) -> SourceFile:
    return SourceFile(
        path=tf.io.gfile.join(input_dir, relative_path),
        relative_path=relative_path,
        class_name=class_name,
        label=label,
        split=split,
    )


def _by_path(source_file: SourceFile) -> str:
    return source_file.relative_path


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def _subfolders(folder: str) -> list:
    """Returns the sorted names of the non-ignored subfolders of folder."""
    names = []
    for entry in tf.io.gfile.listdir(folder):
        # gfile lists gs:// folders with a trailing "/".
        name = entry.rstrip("/")
        if not _is_ignored(name) and tf.io.gfile.isdir(tf.io.gfile.join(folder, name)):
            names.append(name)
    return sorted(names)


def _files_under(input_dir: str, relative_folder: str) -> list:
    """Returns the relative paths of all non-ignored files under input_dir/relative_folder, recursively."""
    relative_paths = []
    top = tf.io.gfile.join(input_dir, relative_folder)
    for folder, subfolders, file_names in tf.io.gfile.walk(top):
        # Pruning in place stops walk() from descending into ignored folders.
        subfolders[:] = [name for name in subfolders if not _is_ignored(name.rstrip("/"))]
        prefix = relative_folder + folder[len(top):].rstrip("/")
        for name in file_names:
            if not _is_ignored(name):
                relative_paths.append(f"{prefix}/{name}")
    return sorted(relative_paths)
