"""File names as both readers of image folders see them: the converter (its walk and its file lists) and
`python -m trainer.predict` (its listing of files to label).

Local folders are listed through the operating system, which gives a name whose bytes are not UTF-8 back with
surrogates, where tf.io.gfile fails on the whole folder; remote ones (gs://) through tf.io.gfile. Such a name cannot
be held in the manifest, labels.txt, CSV or JSON, which are UTF-8 text: is_utf8 finds it, escaped shows it.
"""

import os

import tensorflow as tf


def is_local(path: str) -> bool:
    """True for a path on this machine's disk (no scheme such as gs://)."""
    return "://" not in path


def is_utf8(name: str) -> bool:
    """False for a local file name whose bytes are not UTF-8 (Python gives those bytes as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escaped(path: str) -> str:
    """path as UTF-8 text: the bytes of a local name that is not UTF-8 (surrogates here) escaped as \\xe9."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_folder(path: str) -> bool:
    return os.path.isdir(path) if is_local(path) else tf.io.gfile.isdir(path)


def entries(folder: str) -> list[str]:
    """The names in a folder: locally through the operating system (a name that is not UTF-8 comes back with
    surrogates), remotely through tf.io.gfile (without the "/" it ends gs:// folders with)."""
    if is_local(folder):
        return os.listdir(folder)
    return [entry.rstrip("/") for entry in tf.io.gfile.listdir(folder)]
