"""Which image files the PATH arguments of `python -m trainer.predict` name (list_inputs), by one rule that the
check of --output (trainer/exports/output_files.py) also reads: an argument is a folder if one has that name, else
a file if it exists, else a glob. Folders are walked with their links resolved, each real folder once; hidden files
are skipped; a local name whose bytes are not UTF-8 is reported as a file that cannot be labelled, not a stop.
"""

import dataclasses
import os
import posixpath
import unicodedata

import tensorflow as tf

from tfrecords import names

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
    if not names.is_utf8(path):
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
            if comparable_path(path) not in listing.folders and not _walk(path, listing):
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
            matched = comparable_path(match) in listing.folders or _walk(match, listing) or matched
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
        real = comparable_path(current)
        if real in listing.folders:
            listing.warnings.append(f"{printable(current)}: skipped, a link to {printable(listing.folders[real])}, "
                                    "a folder already listed")
            continue
        listing.folders[real] = current
        try:
            entry_names = names.entries(current)
        except (OSError, tf.errors.OpError) as error:
            listing.skipped[current] = f"folder cannot be read ({getattr(error, 'strerror', None) or error})"
            continue
        for name in sorted(entry_names, reverse=True):  # popped from the end: walked in sorted order
            path = tf.io.gfile.join(current, name)
            if name.startswith("."):
                continue
            if not names.is_utf8(name):
                listing.skipped[path] = NOT_UTF8_REASON
            elif names.is_folder(path):
                pending.append(path)
            else:
                found.append(path)
    listing.files.extend(sorted(found))
    return bool(found) or len(listing.skipped) > num_skipped


def printable(text: str) -> str:
    """`text` for one line of a terminal: the bytes of a name that is not UTF-8 (surrogates) escaped as "\\xff",
    control characters and line or paragraph separators as Python writes them ("\\n", "\\r", "\\x1b", "\\u2028"),
    the rest as it is. For display only: CSV and JSON keep names as they are."""
    text = names.escaped(text)
    return "".join(repr(character)[1:-1] if unicodedata.category(character) in ("Cc", "Zl", "Zp") else character
                   for character in text)


def _base_name(path: str) -> str:
    return path.rstrip("/").rpartition("/")[2]


def comparable_path(path: str) -> str:
    """A path in one spelling: a local one absolute with its links resolved (so `./run` or a link to the
    model_dir is the model_dir), a remote one (gs://...) with "." and ".." and doubled or trailing "/" removed."""
    if "://" in path:
        scheme, _, rest = path.partition("://")
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.realpath(path)
