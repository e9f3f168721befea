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
input_dir, which need not be class folders), split by the same hash as class folders. With `file_list`,
the files are the paths of a text file, one per line, or of a CSV's path column (file_list_columns), in
either folder layout: nothing is walked (_list_file_list).

Class names must be usable as label names: a name with a line break or another control character is
refused (labels.txt has one name per line). Any other name, including spaces, non-ASCII letters and
characters that are awkward in paths, is kept as it is: it is only stored, never used as a path.

Ignored on purpose: hidden files and folders (names starting with "."; e.g. .DS_Store, .ipynb_checkpoints),
`__MACOSX` folders (debris of zips made on macOS), and plain files at the top level (LICENSE.txt,
README). Every other regular file inside a class folder is a candidate: its format is detected from its
bytes later (`tfrecords.writing.images`), not from its extension, and files that are not images are skipped then.

Local folders are walked with the operating system's calls, under this policy:
- Symbolic links are followed, to files and folders, also outside input_dir; but no real file or folder
  is listed twice: a link loop, or a second path to a file already listed, is skipped with a reason.
- Each real file belongs to the class folder that really holds it. A link inside one class that reaches
  into another class folder is skipped ("symbolic link into ...") and reported in the manifest's
  `label_conflicts`: the files keep their own class. Files outside every class folder that two classes
  both link to keep the first class by path, also reported. Two class folders that are one real folder
  are refused.
- Only regular files are candidates: FIFOs, sockets and devices are skipped with the reason, never
  opened (a FIFO named .jpg would block a reader forever), and so are broken links.
- A folder that cannot be read (permissions) stops the listing with an error: its files would be lost.
A class that ends up with no files, or with fewer files than it lost to other classes, is refused by
tfrecords/build.py, which knows the duplicates too.

gs:// and other remote paths go through tf.io.gfile (no links or special files there); their class folders
are listed concurrently (REMOTE_LISTING_THREADS), each in sorted order, so the listing is the same.
"""

import concurrent.futures
import csv
import dataclasses
import io
import os
import posixpath
import re
import stat

from absl import logging
import tensorflow as tf

from tfrecords import names
from tfrecords.writing import plan

LAYOUT_CLASS_FOLDERS = "class_folders"
REMOTE_LISTING_THREADS = 16  # class folders of a gs:// input listed at once
LAYOUT_PRE_SPLIT = "pre_split"
LAYOUT_LABELS_CSV = "labels_csv"
CSV_HEADER = ["path", "label"]
TRAIN_FOLDER = "train"
VALIDATION_FOLDERS = ("validation", "val")
TEST_FOLDER = "test"
IGNORED_NAMES = ("__MACOSX",)
# A CSV --file_list's path column, the first of these its header names (Cloud Storage inventory reports: "name").
FILE_LIST_PATH_COLUMNS = ("path", "name", "key", "object")
UTF8_BOM = b"\xef\xbb\xbf"  # the byte-order mark some editors write at the start of UTF-8 text
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # a line starting like gs:// is a full path
LOOSE = "loose"  # path_entry of a file directly in a split folder
LOOSE_FILE_REASON = "directly in a split folder, outside every class folder; move it into its class folder"
NOT_UTF8_REASON = "its name is not UTF-8 text (records and the manifest store names as UTF-8); rename it"


@dataclasses.dataclass(frozen=True)
class Listing:
    """Everything found in an input folder.

    Attributes:
        layout: LAYOUT_CLASS_FOLDERS or LAYOUT_PRE_SPLIT.
        classes: sorted class names; the label id of a class is its index.
        files: all candidate files, sorted by relative_path.
        skipped: {"path", "reason"} of entries passed over (links to files listed elsewhere, special
            files, broken links), for the manifest.
        label_conflicts: {"paths", "classes"} of links from one class into another (the first path is
            where the file is listed).
    """

    layout: str
    classes: list[str]
    files: list[plan.SourceFile]
    skipped: list = dataclasses.field(default_factory=list)
    label_conflicts: list = dataclasses.field(default_factory=list)


def assign_split(*, relative_path: str, seed: int, validation_fraction: float, test_fraction: float) -> str:
    """Returns the split ("train", "validation" or "test") of one file in the class-folder layout."""
    fraction = plan.stable_fraction(seed=seed, relative_path=relative_path)
    if fraction < test_fraction:
        return "test"
    if fraction < test_fraction + validation_fraction:
        return "validation"
    return "train"


def list_images(
    *, input_dir: str, validation_fraction: float, test_fraction: float, seed: int, labels_csv: str | None = None,
    file_list: str | None = None,
) -> Listing:
    """Lists the candidate image files of input_dir, with class, label and split.

    Args:
        input_dir: local or gs:// folder in one of the two layouts of this module's docstring.
        validation_fraction: share of files for validation (class-folder layout only).
        test_fraction: share of files for test (class-folder layout only).
        seed: seed of the split assignment (class-folder layout only).
        labels_csv: optional CSV of path,label rows; replaces the folder layouts.
        file_list: optional text file of the files' paths, one per line, in one of the two folder layouts;
            replaces walking the folders (see _list_file_list).

    Returns:
        A Listing.

    Raises:
        ValueError: the folder is missing, has fewer than two classes or no files, or the fractions
            are out of range.
    """
    check_fractions(validation_fraction=validation_fraction, test_fraction=test_fraction)
    if not tf.io.gfile.isdir(input_dir):
        raise ValueError(
            f"--input_dir {input_dir!r} does not exist or is not a folder; "
            "expected <input_dir>/<class>/<image files>"
        )
    if labels_csv and file_list:
        raise ValueError("--labels_csv and --file_list both list the files; pass only one")
    if file_list:
        listing = _list_file_list(
            input_dir=input_dir, file_list=file_list, validation_fraction=validation_fraction,
            test_fraction=test_fraction, seed=seed,
        )
    elif labels_csv:
        listing = _list_labels_csv(
            input_dir=input_dir, labels_csv=labels_csv, validation_fraction=validation_fraction,
            test_fraction=test_fraction, seed=seed,
        )
    else:
        listing = _walk_folders(
            input_dir=input_dir, validation_fraction=validation_fraction, test_fraction=test_fraction, seed=seed
        )
    # A name that is not UTF-8 is recorded with its odd bytes escaped (\xe9): the manifest is UTF-8 JSON.
    skipped = [{**entry, "path": names.escaped(entry["path"])} for entry in listing.skipped]
    return dataclasses.replace(listing, skipped=skipped)


def _walk_folders(*, input_dir: str, validation_fraction: float, test_fraction: float, seed: int) -> Listing:
    """Lists the class folders of input_dir by walking them (the policy of this module's docstring)."""
    layout, roots = find_roots(input_dir)
    class_names = sorted({class_name for class_name, _ in roots.values()})
    check_classes(class_names=class_names, input_dir=input_dir)
    labels = {name: label for label, name in enumerate(class_names)}
    walk = _Walk(input_dir, {root: class_name for root, (class_name, _) in roots.items()})
    files = []
    for root, (class_name, split) in roots.items():
        for relative_path in walk.files_under(root):
            files.append(source_file_of(
                input_dir=input_dir, relative_path=relative_path, class_name=class_name, label=labels[class_name],
                split=split, seed=seed, validation_fraction=validation_fraction, test_fraction=test_fraction,
            ))
    check_has_files(num_files=len(files), input_dir=input_dir)
    loose = [] if layout != LAYOUT_PRE_SPLIT else _loose_files(input_dir, {root.split("/")[0] for root in roots})
    return Listing(
        layout=layout, classes=class_names, files=sorted(files, key=_by_path),
        skipped=sorted(loose + walk.skipped, key=lambda entry: entry["path"]), label_conflicts=walk.label_conflicts,
    )


def _loose_files(input_dir: str, split_folders: set) -> list:
    """The skipped lines of the files directly in the split folders of a pre-split input (next to its class
    folders): they belong to no class, so they are not read, but they are not left out silently either."""
    skipped = []
    for split_folder in sorted(split_folders):
        for name in names.entries(tf.io.gfile.join(input_dir, split_folder)):
            if not _is_ignored(name) and not names.is_folder(tf.io.gfile.join(input_dir, split_folder, name)):
                skipped.append({"path": f"{split_folder}/{name}", "reason": LOOSE_FILE_REASON})
    return skipped


def find_roots(input_dir: str) -> tuple:
    """Finds the layout and the class folders of input_dir (its top level and split folders only).

    Returns:
        (layout, roots): roots maps each class folder's path relative to input_dir to (class name, split),
        the split None in the class-folder layout (each file's split then comes from its path).

    Raises:
        ValueError: both validation/ and val/, or a split folder without class folders.
    """
    top_folders = _subfolders(input_dir)
    validation_folders = [name for name in VALIDATION_FOLDERS if name in top_folders]
    if not (TRAIN_FOLDER in top_folders and validation_folders):
        return LAYOUT_CLASS_FOLDERS, {name: (name, None) for name in top_folders}
    if len(validation_folders) > 1:
        raise ValueError(f"--input_dir {input_dir!r} has both 'validation' and 'val' folders; keep only one")
    split_folders = {"train": TRAIN_FOLDER, "validation": validation_folders[0]}
    if TEST_FOLDER in top_folders:
        split_folders["test"] = TEST_FOLDER
    for name in sorted(set(top_folders) - set(split_folders.values())):
        logging.warning("Ignoring folder %r of pre-split --input_dir %r", name, input_dir)
    roots = {}
    for split, split_folder in split_folders.items():
        class_names = _subfolders(tf.io.gfile.join(input_dir, split_folder))
        if not class_names:
            raise ValueError(
                f"--input_dir {input_dir!r} looks pre-split but {split_folder + '/'!r} has no class "
                f"subfolders; expected <input_dir>/{split_folder}/<class>/<image files>"
            )
        roots.update({f"{split_folder}/{name}": (name, split) for name in class_names})
    return LAYOUT_PRE_SPLIT, roots


def source_file_of(
    *, input_dir: str, relative_path: str, class_name: str, label: int, split: str | None, seed: int,
    validation_fraction: float, test_fraction: float,
) -> plan.SourceFile:
    """The plan.SourceFile of a listed path; split None assigns it from the path (assign_split)."""
    if split is None:
        split = assign_split(
            relative_path=relative_path, seed=seed, validation_fraction=validation_fraction, test_fraction=test_fraction
        )
    return plan.SourceFile(
        path=tf.io.gfile.join(input_dir, relative_path), relative_path=relative_path, class_name=class_name,
        label=label, split=split,
    )


def check_fractions(*, validation_fraction: float, test_fraction: float) -> None:
    """Refuses a negative fraction, or fractions that leave nothing for training."""
    for name, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if value < 0:
            raise ValueError(f"--{name}={value} is negative; use a fraction in [0, 1), e.g. 0.2")
    if validation_fraction + test_fraction >= 1:
        raise ValueError(
            f"--validation_fraction={validation_fraction} plus --test_fraction={test_fraction} is "
            f"{validation_fraction + test_fraction:g}, which leaves nothing for training; "
            "make their sum less than 1 (e.g. 0.2 and 0.1)"
        )


def _list_file_list(
    *, input_dir: str, file_list: str, validation_fraction: float, test_fraction: float, seed: int
) -> Listing:
    """Lists the files a text file names (one path per line) instead of walking input_dir.

    For inputs too large to walk, e.g. a bucket of millions of objects: the list can come from an object
    inventory or `gcloud storage ls 'gs://bucket/photos/**'`. A line ends at "\\n" (or "\\r\\n") only and is
    taken exactly as written (file_list_path): a full path (starting with "/" or gs://) inside input_dir, or
    else a path relative to input_dir. There is no comment syntax: names may start with "#". Empty lines are
    skipped, a path listed twice counts once; a line of no class folder (e.g. "# note") names a top-level file,
    ignored as walking ignores one. The classes and splits come from the paths exactly as from the folders
    (class folders, or pre-split train/validation|val/test folders), with the same ignore rules (hidden names,
    __MACOSX, top-level files) and the same skipped lines (files directly in a split folder). Nothing is
    checked per object remotely: a listed object that does not exist is skipped with "cannot read file" when
    it is read. Local paths are checked as walking checks the files it finds (_local_listed_files): links
    followed under the same policy, special files skipped; a path that is not there is skipped with the
    reason. Skipped files count towards --max_skipped_fraction.
    """
    relative_paths = _read_file_list(file_list, input_dir)
    where = f"--file_list {file_list!r}"
    pre_split, split_of_folder = path_layout({path.split("/")[0] for path in relative_paths}, where=where)
    entries, skipped = [], []  # entries: (relative_path, class_name, split or None)
    for relative_path in sorted(relative_paths):
        entry = path_entry(relative_path, pre_split=pre_split, split_of_folder=split_of_folder)
        if entry == LOOSE:
            skipped.append({"path": relative_path, "reason": LOOSE_FILE_REASON})
        elif entry:
            entries.append((relative_path, *entry))
    if pre_split:
        check_split_folders(
            listed={path.split("/")[0] for path in relative_paths} & set(split_of_folder),
            with_classes={path.split("/")[0] for path, _, _ in entries}, input_dir=input_dir,
        )
    class_names = sorted({class_name for _, class_name, _ in entries})
    check_classes(class_names=class_names, input_dir=input_dir, file_list=file_list)
    labels = {name: label for label, name in enumerate(class_names)}
    label_conflicts = []
    if names.is_local(input_dir):
        entries, walk = _local_listed_files(input_dir, entries, pre_split=pre_split)
        skipped, label_conflicts = skipped + walk.skipped, walk.label_conflicts
    files = []
    for relative_path, class_name, split in entries:
        files.append(source_file_of(
            input_dir=input_dir, relative_path=relative_path, class_name=class_name, label=labels[class_name],
            split=split, seed=seed, validation_fraction=validation_fraction, test_fraction=test_fraction,
        ))
    check_has_files(num_files=len(files), input_dir=input_dir)
    return Listing(layout=LAYOUT_PRE_SPLIT if pre_split else LAYOUT_CLASS_FOLDERS, classes=class_names,
                   files=sorted(files, key=_by_path), skipped=sorted(skipped, key=lambda entry: entry["path"]),
                   label_conflicts=label_conflicts)


def _local_listed_files(input_dir: str, entries: list, *, pre_split: bool) -> tuple:
    """The listed entries of a local input that walking would list, and the _Walk that judged them (its skipped
    lines and label conflicts).

    Each listed file goes through the walk's own check (_Walk.add_file): links are followed under the walk's
    policy (a path through a link into another class folder is skipped, a second path to a file already
    listed too), special files are skipped. As the walk lists real entries before links, paths without a link
    on the way are judged first, then the others, each group in path order.
    """
    depth = 2 if pre_split else 1
    walk = _Walk(input_dir, {"/".join(path.split("/")[:depth]): class_name for path, class_name, _ in entries})
    real_input = os.path.realpath(input_dir)
    plain, linked = [], []
    for entry in entries:
        path = os.path.join(input_dir, entry[0])
        if not names.is_utf8(entry[0]):
            walk.skipped.append({"path": entry[0], "reason": NOT_UTF8_REASON})
        elif not os.path.lexists(path):
            walk.skipped.append({"path": entry[0], "reason": "named in --file_list but not in --input_dir"})
        elif os.path.realpath(path) == os.path.join(real_input, entry[0]):
            plain.append(entry)
        else:
            linked.append(entry)
    kept = []
    for relative_path, class_name, split in plain + linked:
        if walk.add_file(relative_path, "/".join(relative_path.split("/")[:depth])):
            kept.append((relative_path, class_name, split))
    return kept, walk


def _read_file_list(file_list: str, input_dir: str) -> set:
    """The candidate paths of a --file_list, relative to input_dir (ignored names and top-level files left out)."""
    check_file_list(file_list)
    with tf.io.gfile.GFile(file_list, "rb") as list_file:
        data = list_file.read()
    lines = [decode_list_line(line) for line in data.removeprefix(UTF8_BOM).split(b"\n")]
    columns = file_list_columns(file_list, lines[0] if lines else "")
    relative_paths = set()
    for line_number, line in enumerate(lines, start=1):
        if columns and line_number == 1:
            continue  # the CSV's header
        where = f"--file_list {file_list!r} line {line_number}"
        relative_path = file_list_path(file_list_entry(line, columns, where=where), input_dir=input_dir, where=where)
        if relative_path:
            relative_paths.add(relative_path)
    return relative_paths


def check_file_list(file_list: str) -> None:
    """Refuses a --file_list that is missing, a folder, or UTF-16 text (read as UTF-8 it would name nothing).

    Raises:
        ValueError: one line naming the flag and the file.
    """
    if not tf.io.gfile.exists(file_list):
        raise ValueError(f"--file_list {file_list!r} does not exist; expected a text file of paths, one per line")
    if tf.io.gfile.isdir(file_list):
        raise ValueError(f"--file_list {file_list!r} is a folder; expected a text file of paths, one per line")
    with tf.io.gfile.GFile(file_list, "rb") as list_file:
        if list_file.read(2) in (b"\xff\xfe", b"\xfe\xff"):
            raise ValueError(f"--file_list {file_list!r} is UTF-16 text; save it as UTF-8 (one path per line)")


def decode_list_line(line: bytes) -> str:
    """A --file_list line as text, without its line end ("\\n" or "\\r\\n": a line ends nowhere else, so Unicode
    line separators and a lone carriage return stay inside the name). Bytes that are not UTF-8 are kept as
    surrogates (Python's file-name convention): such a file is then skipped with NOT_UTF8_REASON, as walking
    skips it."""
    return line.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8", "surrogateescape")


def file_list_columns(file_list: str, header: str) -> tuple | None:
    """For a CSV --file_list (a name ending in .csv, e.g. a Cloud Storage inventory report), the indexes of its
    (path, bucket) columns from its header; bucket is None when there is no such column. None for a text list.

    Raises:
        ValueError: a CSV without a path column.
    """
    if not file_list.lower().endswith(".csv"):
        return None
    names = [name.strip().lower() for name in next(csv.reader([header]), [])]
    path_column = next((names.index(name) for name in FILE_LIST_PATH_COLUMNS if name in names), None)
    if path_column is None:
        raise ValueError(
            f"--file_list {file_list!r} is a CSV whose header {header!r} names no path column; expected one of "
            f"{', '.join(FILE_LIST_PATH_COLUMNS)} (and optionally bucket, as in a Cloud Storage inventory report)"
        )
    if "label" in names:
        raise ValueError(
            f"--file_list {file_list!r} has a label column; pass it as --labels_csv (a --file_list takes each "
            "file's class from its folder)"
        )
    return path_column, names.index("bucket") if "bucket" in names else None


def file_list_entry(line: str, columns: tuple | None, *, where: str) -> str:
    """The path a --file_list line gives: the line itself, or in a CSV its path column (gs://<bucket>/<name>
    when there is a bucket column)."""
    if columns is None or not line:
        return line
    path_column, bucket_column = columns
    try:
        fields = next(csv.reader([line], strict=True))
    except csv.Error as error:
        raise ValueError(
            f"{where} is {line!r}: not one CSV row ({error}); a CSV list holds one row per line, so a name with "
            "a line break cannot be listed"
        ) from error
    if len(fields) <= max(path_column, bucket_column or 0):
        raise ValueError(f"{where} is {line!r}: fewer fields than the header names; expected a row of the same columns")
    if bucket_column is None:
        return fields[path_column]
    return f"gs://{fields[bucket_column]}/{fields[path_column]}"


def file_list_path(line: str, *, input_dir: str, where: str) -> str | None:
    """The path relative to input_dir that a --file_list line names, or None for a line that names no candidate
    (empty, a top-level file, a hidden or ignored name).

    The line is taken exactly as written: no comment syntax, no spaces stripped (names may start with "#" or
    a space). One rule says what it is relative to: a line starting with "/" or a scheme ("gs://") is a full
    path, which must lie inside input_dir (a relative input_dir is taken from the current folder); any other
    line is relative to input_dir, even when its first folder has input_dir's name.

    Raises:
        ValueError: a full path outside input_dir, a path leaving it with "..", or a NUL byte (`where` names
            the line in the message).
    """
    if not line:
        return None
    if "\0" in line:
        raise ValueError(f"{where} holds a NUL byte; expected UTF-8 text, one path per line")
    if not names.is_local(input_dir) and not names.is_utf8(line):
        raise ValueError(
            f"{where} is not UTF-8 text ({names.escaped(line)!r}), so it names no object of --input_dir "
            f"{input_dir!r} (object names are UTF-8); save the list as UTF-8"
        )
    relative_path = _relative_list_path(line, input_dir=input_dir, where=where)
    parts = relative_path.split("/")
    if relative_path == "." or len(parts) < 2 or any(_is_ignored(part) for part in parts):
        return None
    return relative_path


def _relative_list_path(line: str, *, input_dir: str, where: str) -> str:
    if line.startswith("/") or _SCHEME.match(line):
        root = input_dir.rstrip("/") if not names.is_local(input_dir) else os.path.abspath(input_dir)
        full = line if not names.is_local(line) else posixpath.normpath(line)
        relative_path = full[len(root) + 1:] if full.startswith(root + "/") else "." if full == root else None
    else:
        root, relative_path = None, line
    if relative_path is not None:
        relative_path = posixpath.normpath(relative_path)
    if relative_path is None or relative_path.startswith("/") or relative_path.split("/")[0] == "..":
        resolved = f" ({root})" if root and root != input_dir else ""
        raise ValueError(
            f"{where} path {line!r} is not inside --input_dir {input_dir!r}{resolved}; list paths relative to "
            "--input_dir, or full paths under it"
        )
    return relative_path


def path_layout(top_folders: set, *, where: str) -> tuple:
    """The layout of listed paths from their top-level folders: (pre_split, split of each split folder's name).

    Pre-split when a train folder and a validation (or val) folder are both there, as for a walked folder.

    Raises:
        ValueError: both validation and val folders.
    """
    validation_folders = [name for name in VALIDATION_FOLDERS if name in top_folders]
    if len(validation_folders) > 1:
        raise ValueError(f"{where} names both 'validation' and 'val' folders; keep only one")
    pre_split = TRAIN_FOLDER in top_folders and bool(validation_folders)
    if pre_split:
        split_folders = {TRAIN_FOLDER, TEST_FOLDER, *validation_folders}
        for name in sorted(top_folders - split_folders):
            logging.warning("Ignoring folder %r of pre-split %s", name, where)
    split_of_folder = {TRAIN_FOLDER: "train", TEST_FOLDER: "test", **{name: "validation" for name in validation_folders}}
    return pre_split, split_of_folder


def path_entry(relative_path: str, *, pre_split: bool, split_of_folder: dict) -> tuple | str | None:
    """(class name, split or None) of a listed path in its layout; LOOSE for a file directly in a split folder
    (skipped with LOOSE_FILE_REASON, as walking skips it); None for a path outside every split folder."""
    parts = relative_path.split("/")
    if not pre_split:
        return parts[0], None
    if parts[0] in split_of_folder:
        return (parts[1], split_of_folder[parts[0]]) if len(parts) > 2 else LOOSE
    return None


def check_split_folders(*, listed: set, with_classes: set, input_dir: str) -> None:
    """Refuses a split folder of a pre-split input that holds no class folder (e.g. test/ of loose images).

    Args:
        listed: the split folders that are there (their names).
        with_classes: the split folders that hold at least one class folder.
    """
    for name in sorted(listed - with_classes):
        raise ValueError(
            f"--input_dir {input_dir!r} looks pre-split but {name + '/'!r} has no class subfolders; expected "
            f"<input_dir>/{name}/<class>/<image files>"
        )


def _list_labels_csv(
    *, input_dir: str, labels_csv: str, validation_fraction: float, test_fraction: float, seed: int
) -> Listing:
    if not tf.io.gfile.exists(labels_csv):
        raise ValueError(f"--labels_csv {labels_csv!r} does not exist; expected a CSV of path,label rows")
    with tf.io.gfile.GFile(labels_csv, "rb") as csv_file:
        # utf-8-sig drops the byte-order mark Excel writes, which would otherwise glue onto the header.
        rows = [row for row in csv.reader(io.StringIO(csv_file.read().decode("utf-8-sig"))) if row]
    if rows and [cell.strip() for cell in rows[0]] == CSV_HEADER:
        rows = rows[1:]
    labels_by_path = {}
    for line_number, row in enumerate(rows, start=1):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"--labels_csv {labels_csv!r} row {line_number} is {row!r}; expected path,label")
        relative_path, label_name = posixpath.normpath(row[0].strip()), row[1].strip()
        if relative_path.startswith("/") or relative_path.split("/")[0] == "..":
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
    check_classes(class_names=class_names, input_dir=input_dir)
    missing = [path for path in labels_by_path if not tf.io.gfile.exists(tf.io.gfile.join(input_dir, path))]
    if missing:
        raise ValueError(
            f"--labels_csv {labels_csv!r} names {len(missing)} files that are not in --input_dir {input_dir!r} "
            f"(e.g. {missing[:3]}); fix the paths (relative to --input_dir) or remove those rows"
        )
    skipped = []
    if names.is_local(input_dir):
        for relative_path in sorted(labels_by_path):
            reason = _special_file_reason(os.path.join(input_dir, relative_path))
            if reason:
                skipped.append({"path": relative_path, "reason": reason})
                del labels_by_path[relative_path]
    labels = {name: label for label, name in enumerate(class_names)}
    files = [
        source_file_of(
            input_dir=input_dir, relative_path=relative_path, class_name=class_name, label=labels[class_name],
            split=None, seed=seed, validation_fraction=validation_fraction, test_fraction=test_fraction,
        )
        for relative_path, class_name in labels_by_path.items()
    ]
    return Listing(layout=LAYOUT_LABELS_CSV, classes=class_names, files=sorted(files, key=_by_path), skipped=skipped)


def check_classes(*, class_names: list, input_dir: str, file_list: str | None = None) -> None:
    """Refuses fewer than two classes, or a class name that cannot be a line of labels.txt."""
    list_hint = f" (is --file_list {file_list!r} saved as UTF-8?)" if file_list else ""
    for name in class_names:
        if not names.is_utf8(name):
            raise ValueError(
                f"--input_dir {input_dir!r} has a class named {names.escaped(name)!r}, not UTF-8 text{list_hint}; "
                "rename it (labels.txt and the records store names as UTF-8)"
            )
        if any(not character.isprintable() for character in name):
            raise ValueError(
                f"--input_dir {input_dir!r} has a class named {name!r}, with a line break or control "
                "character; rename it (labels.txt holds one class name per line)"
            )
    if not class_names:
        raise ValueError(
            f"--input_dir {input_dir!r} has no class subfolders; expected <input_dir>/<class>/<image files>"
        )
    if len(class_names) == 1 and file_list and class_names[0] == posixpath.basename(input_dir.rstrip("/")):
        raise ValueError(
            f"--file_list {file_list!r} names only one class folder ({class_names[0]!r}), the name of --input_dir: "
            "list paths relative to --input_dir (cats/1.jpg), or full paths (/data/images/cats/1.jpg)"
        )
    if len(class_names) == 1:
        raise ValueError(
            f"--input_dir {input_dir!r} has only one class folder ({class_names[0]!r}); a classifier needs "
            "at least two: <input_dir>/<class>/<image files>"
        )


def check_has_files(*, num_files: int, input_dir: str) -> None:
    """Refuses a listing without a single candidate file."""
    if not num_files:
        raise ValueError(
            f"--input_dir {input_dir!r} has class folders but no files in them; "
            "expected <input_dir>/<class>/<image files>"
        )


def _by_path(source_file: plan.SourceFile) -> str:
    return source_file.relative_path


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def _subfolders(folder: str) -> list:
    """Returns the sorted names of the non-ignored subfolders of folder."""
    subfolders = []
    for name in names.entries(folder):
        if not _is_ignored(name) and names.is_folder(tf.io.gfile.join(folder, name)):
            subfolders.append(name)
    return sorted(subfolders)


def _special_file_reason(path: str) -> str | None:
    """Why a local path is not a regular file to read (without opening it), or None if it is one."""
    try:
        mode = os.stat(path).st_mode  # follows links
    except FileNotFoundError:
        return "broken symbolic link" if os.path.islink(path) else "file vanished while listing"
    except OSError as error:
        return f"cannot read file: {error.strerror}"
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISDIR: "a folder"}
    kind = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
    return f"not a regular file ({kind}); never opened"


class _Walk:
    """Lists the files under class folders, following links under the policy of this module's docstring.

    Remote folders (gs://) are walked with tf.io.gfile; local ones with os.scandir, so links and special
    files are seen. One _Walk serves all class folders of a listing: it remembers every real folder and
    file already listed.
    """

    def __init__(self, input_dir: str, roots: dict):
        """roots: each class folder's path relative to input_dir -> its class name."""
        self.input_dir = input_dir
        self.roots = roots
        self.skipped = []
        self.label_conflicts = []
        self.real_roots = {}
        self.seen_folders = set()
        self.seen_files = {}
        if names.is_local(input_dir):
            for relative_root in sorted(roots):
                real = os.path.realpath(os.path.join(input_dir, relative_root))
                if real in self.real_roots:
                    raise ValueError(
                        f"--input_dir {input_dir!r}: class folders {self.real_roots[real]!r} and {relative_root!r} "
                        f"are the same folder ({real}), so their files would get both labels; keep one"
                    )
                self.real_roots[real] = relative_root
        self.real_root_of = {root: real for real, root in self.real_roots.items()}
        # An object store lists a folder in pages of about a thousand names, one round trip each: the class
        # folders are listed concurrently, so a bucket of many classes lists in the time of its largest few.
        self.remote_files = {}
        if not names.is_local(input_dir):
            with concurrent.futures.ThreadPoolExecutor(max_workers=REMOTE_LISTING_THREADS) as pool:
                listings = pool.map(lambda root: remote_files_under(input_dir, root), sorted(roots))
                self.remote_files = dict(zip(sorted(roots), listings))
        # Class folders are siblings, so another one lies inside a class folder only through a link; where
        # none does, a path inside its own class folder belongs to it without comparing every class folder.
        self.holds_other_roots = {
            root: any(other.startswith(real + os.sep) for other in self.real_roots)
            for real, root in self.real_roots.items()
        }

    def files_under(self, relative_root: str) -> list:
        """Relative paths of the files listed for the class folder relative_root, sorted."""
        if not names.is_local(self.input_dir):
            return self.remote_files[relative_root]
        files = []
        # Real entries first, links after: a file or folder reached both ways is listed under its real path.
        folders, links = [relative_root], []
        while folders or links:
            if folders:
                self._visit(folders.pop(), relative_root, folders, links, files)
                continue
            relative_path = links.pop(0)
            if os.path.isdir(os.path.join(self.input_dir, relative_path)):
                self._visit(relative_path, relative_root, folders, links, files)
            else:
                self.add_file(relative_path, relative_root, files)
        return sorted(files)

    def _visit(self, relative_folder: str, relative_root: str, folders: list, links: list, files: list) -> None:
        folder = os.path.join(self.input_dir, relative_folder)
        real_folder = os.path.realpath(folder)
        if not self._belongs(real_folder, relative_folder, relative_root):
            return
        if real_folder in self.seen_folders:
            if relative_folder != relative_root:
                self.skipped.append({"path": relative_folder, "reason": "symbolic link to a folder already listed "
                                     "(a link loop, or a second path to it); not followed"})
            return
        self.seen_folders.add(real_folder)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            raise ValueError(
                f"--input_dir {self.input_dir!r}: cannot read folder {relative_folder!r} ({error.strerror}); its "
                "files would be left out: fix its permissions, or move it out of --input_dir"
            ) from error
        for entry in entries:
            if _is_ignored(entry.name):
                continue
            relative_path = f"{relative_folder}/{entry.name}"
            try:
                is_folder = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_folder = False
            if entry.is_symlink():
                links.append(relative_path)
            elif is_folder:
                folders.append(relative_path)
            else:
                self.add_file(relative_path, relative_root, files)

    def add_file(self, relative_path: str, relative_root: str, files: list | None = None) -> bool:
        """Judges one file found (or listed) in the class folder relative_root: True (and appended to files)
        when it is listed, False when it is skipped (with its reason in self.skipped)."""
        path = os.path.join(self.input_dir, relative_path)
        reason = NOT_UTF8_REASON if not names.is_utf8(relative_path) else _special_file_reason(path)
        if reason:
            self.skipped.append({"path": relative_path, "reason": reason})
            return False
        real = os.path.realpath(path)
        if not self._belongs(real, relative_path, relative_root):
            return False
        first = self.seen_files.setdefault(real, relative_path)
        if first != relative_path:
            self.skipped.append({"path": relative_path, "reason": f"same file as {first} (symbolic link)"})
            self._conflict(first, relative_path)
            return False
        if files is not None:
            files.append(relative_path)
        return True

    def _belongs(self, real: str, relative_path: str, relative_root: str) -> bool:
        """False (and the path skipped) when a link leads out of this class folder into another one."""
        own = self.real_root_of[relative_root]
        if (real == own or real.startswith(own + os.sep)) and not self.holds_other_roots[relative_root]:
            return True
        owner = None
        for real_root, root in self.real_roots.items():
            if (real == real_root or real.startswith(real_root + os.sep)) and (
                owner is None or len(real_root) > len(owner[0])
            ):
                owner = (real_root, root)
        if owner is not None and owner[1] != relative_root:
            target = owner[1] + real[len(owner[0]):].replace(os.sep, "/")
            self.skipped.append({
                "path": relative_path,
                "reason": f"symbolic link into {owner[1]!r} ({target}); its files are listed there",
            })
            self._conflict(target, relative_path)
            return False
        if owner is None and any(real_root.startswith(real + os.sep) for real_root in self.real_roots):
            self.skipped.append({"path": relative_path, "reason": "symbolic link to a folder holding the class "
                                 "folders (a loop); not followed"})
            return False
        return True

    def _conflict(self, listed: str, link: str) -> None:
        listed_class, link_class = self._class_of(listed), self._class_of(link)
        if listed_class != link_class:
            self.label_conflicts.append({"paths": [listed, link], "classes": [listed_class, link_class]})

    def _class_of(self, relative_path: str) -> str:
        root = max((root for root in self.roots if relative_path == root or relative_path.startswith(root + "/")),
                   key=len)
        return self.roots[root]


def remote_files_under(input_dir: str, relative_folder: str) -> list:
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
