"""Fault injection: unusual but legal inputs, interrupted and concurrent runs, damaged data.

Each test injects one fault a user can meet and checks the tool's promise (README "What we guarantee"):
a one-line error and a non-zero exit, or a documented behaviour; never exit 0 with mislabelled, dropped
or deleted data. Converter cases call tfrecords.build directly or run its CLI; trainer cases run the CLIs.
"""

import io
import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time

from PIL import Image
import pytest
import tensorflow as tf

from tests.conftest import REPO_ROOT
from tfrecords import build
from tfrecords import folder
from tfrecords import schema
from tfrecords import writer

ENVIRONMENT = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO_ROOT)}
SETTINGS = dict(validation_fraction=0.0, test_fraction=0.0, num_shards=1, target_shard_mb=100, seed=42, overwrite=False)


def jpeg(color: tuple, size=(48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_classes(root: Path, counts: dict) -> Path:
    """root/<class>/<class>_<i>.jpg, every image distinct."""
    for class_name, count in sorted(counts.items()):
        (root / class_name).mkdir(parents=True, exist_ok=True)
        shade = int.from_bytes(class_name.encode("utf-8"), "big") % 200
        for index in range(count):
            color = (shade + 20, 7 * index + 10, 200 - 5 * index)
            (root / class_name / f"{class_name}_{index}.jpg").write_bytes(jpeg(color))
    return root


def convert(input_dir: Path, output_dir: Path, **overrides) -> dict:
    return build.build(input_dir=str(input_dir), output_dir=str(output_dir), **{**SETTINGS, **overrides})


def run_cli(module: str, *arguments: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *arguments], cwd=REPO_ROOT, env=ENVIRONMENT,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(result: subprocess.CompletedProcess) -> list:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str, code: int = 2) -> None:
    import re

    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.stderr[-3000:]


def tree(folder_path: Path) -> dict:
    """Every file under a folder with its bytes (links not followed)."""
    return {str(path.relative_to(folder_path)): path.read_bytes()
            for path in sorted(folder_path.rglob("*")) if path.is_file() and not path.is_symlink()}


# --- Conversions that must not relabel or lose files -------------------------------------------------


def test_symlinked_folder_into_another_class_is_a_label_conflict_not_a_stolen_class(tmp_path):
    images = make_classes(tmp_path / "images", {"cats": 3, "dogs": 3})
    # Before: sorted first, cats/dogs_link/... kept the dogs' images as cats and left dogs empty, exit 0.
    (images / "cats" / "dogs_link").symlink_to(images / "dogs", target_is_directory=True)
    manifest = convert(images, tmp_path / "out")
    assert manifest["splits"]["train"]["class_counts"] == {"cats": 3, "dogs": 3}
    assert {"path": "cats/dogs_link", "reason": "symbolic link into 'dogs' (dogs); its files are listed there"} in manifest["skipped"]
    assert manifest["label_conflicts"] == [{"paths": ["dogs", "cats/dogs_link"], "classes": ["dogs", "cats"]}]


def test_a_class_made_only_of_links_into_another_class_is_refused(tmp_path):
    images = make_classes(tmp_path / "images", {"cats": 2, "dogs": 2})
    (images / "birds").mkdir()
    for path in (images / "dogs").iterdir():
        (images / "birds" / path.name).symlink_to(path)
    with pytest.raises(build.InputError, match=r"class 'birds' would have 0 images: 2 of its entries are links"):
        convert(images, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_link_loops_and_second_paths_are_listed_once(tmp_path):
    images = make_classes(tmp_path / "images", {"cats": 2, "dogs": 2})
    (images / "cats" / "loop").symlink_to(images / "cats", target_is_directory=True)
    (images / "cats" / "sub").mkdir()
    (images / "cats" / "sub" / "deeper").symlink_to(images / "cats" / "sub", target_is_directory=True)
    (images / "dogs" / "again.jpg").symlink_to(images / "dogs" / "dogs_0.jpg")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "extra.jpg").write_bytes(jpeg((1, 2, 3)))
    (images / "dogs" / "extra").symlink_to(outside, target_is_directory=True)
    listing = folder.list_images(input_dir=str(images), validation_fraction=0, test_fraction=0, seed=1)
    assert [source.relative_path for source in listing.files] == [
        "cats/cats_0.jpg", "cats/cats_1.jpg", "dogs/dogs_0.jpg", "dogs/dogs_1.jpg", "dogs/extra/extra.jpg",
    ]
    reasons = {entry["path"]: entry["reason"] for entry in listing.skipped}
    assert reasons["cats/loop"].startswith("symbolic link to a folder already listed")
    assert reasons["cats/sub/deeper"].startswith("symbolic link to a folder already listed")
    assert reasons["dogs/again.jpg"] == "same file as dogs/dogs_0.jpg (symbolic link)"
    assert listing.label_conflicts == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_special_files_are_skipped_with_a_reason_and_never_opened(tmp_path):
    images = make_classes(tmp_path / "images", {"cats": 2, "dogs": 2})
    # Before: a FIFO named .jpg blocked the converter forever (the timeout below would fire).
    os.mkfifo(images / "cats" / "pipe.jpg")
    (images / "dogs" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    result = run_cli("tfrecords.build", f"--input_dir={images}", f"--output_dir={tmp_path / 'out'}", "--num_shards=1",
                     timeout=120)
    assert_one_line_error(result, r"2 of 6 files \(33.3%\) could not be decoded", code=1)
    result = run_cli("tfrecords.build", f"--input_dir={images}", f"--output_dir={tmp_path / 'out'}", "--num_shards=1",
                     "--max_skipped_fraction=0.5", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / schema.MANIFEST_FILE).read_text())
    reasons = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert reasons == {"cats/pipe.jpg": "not a regular file (a FIFO); never opened",
                       "dogs/dangling.jpg": "broken symbolic link"}


def test_unreadable_class_subfolder_stops_the_listing(tmp_path, monkeypatch):
    images = make_classes(tmp_path / "images", {"cats": 2, "dogs": 2})
    (images / "dogs" / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path):
        # Root ignores permission bits, so the fault is injected where the listing reads the folder.
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(folder.os, "scandir", scandir)
    with pytest.raises(build.InputError, match=r"cannot read folder 'dogs/locked' \(Permission denied\)"):
        convert(images, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_foreign_output_folder_is_refused_and_left_untouched(tmp_path):
    images = make_classes(tmp_path / "images", {"cats": 2, "dogs": 2})
    output = tmp_path / "mine"
    (output / "_progress").mkdir(parents=True)
    (output / "_progress" / "notes.txt").write_text("my notes")
    (output / "train-00000-of-00001.tfrecord").write_bytes(b"someone else's shard")
    (output / "labels.txt").write_text("my labels\n")
    before = tree(output)
    # Before: the shard-named file and _progress/ were deleted and labels.txt overwritten.
    result = run_cli("tfrecords.build", f"--input_dir={images}", f"--output_dir={output}", "--num_shards=1",
                     "--overwrite")
    assert_one_line_error(result, r"is not empty \('_progress', 'labels.txt', .*not written by tfrecords.build")
    assert tree(output) == before


def test_output_inside_input_and_input_inside_output_are_refused(tmp_path):
    images = make_classes(tmp_path / "images", {"cats": 2, "dogs": 2})
    with pytest.raises(build.InputError, match=r"is inside --input_dir"):
        convert(images, images / "tfrecords")
    with pytest.raises(build.InputError, match=r"--input_dir .* is inside --output_dir"):
        convert(images, tmp_path)
    assert sorted(path.name for path in images.iterdir()) == ["cats", "dogs"]


def test_overwrite_replaces_only_the_converters_own_files_and_only_after_listing(tmp_path):
    images = make_classes(tmp_path / "images", {"cats": 2, "dogs": 2})
    output = tmp_path / "out"
    first = convert(images, output)
    (output / "_progress").mkdir()
    (output / "_progress" / "notes.txt").write_text("a user's file")
    (output / "README.md").write_text("a user's file")
    # A rerun whose input is refused (a class left empty) must leave the finished conversion intact.
    for path in (images / "dogs").iterdir():
        path.unlink()
    finished = tree(output)
    with pytest.raises(build.InputError, match=r"class 'dogs' would have 0 images"):
        convert(images, output, overwrite=True)
    assert tree(output) == finished
    make_classes(images, {"dogs": 3})
    second = convert(images, output, overwrite=True)
    assert second["splits"]["train"]["class_counts"] == {"cats": 2, "dogs": 3} != first["splits"]["train"]["class_counts"]
    assert (output / "_progress" / "notes.txt").read_text() == "a user's file"
    assert (output / "README.md").read_text() == "a user's file"


@pytest.mark.parametrize("name", ["$x^2$", "100%", "{braces}", "a\\b", "日本語", "with space", "-dash"])
def test_any_legal_folder_name_is_a_class_name_through_conversion(tmp_path, name):
    images = make_classes(tmp_path / "images", {name: 2, "plain": 2})
    manifest = convert(images, tmp_path / "out")
    assert manifest["classes"] == sorted([name, "plain"])
    assert (tmp_path / "out" / schema.LABELS_FILE).read_text().splitlines() == manifest["classes"]
