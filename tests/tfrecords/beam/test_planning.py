"""tfrecords/beam/planning.py: the workers list, hash and plan; the result is the local converter's, byte for byte.

In-process with FnApiRunner, so the remote inputs can live on TensorFlow's in-memory ram:// file system.
"""

import json
from pathlib import Path

import pytest
import tensorflow as tf

pytest.importorskip("apache_beam")

from tfrecords.beam import pipeline  # noqa: E402 (after the importorskip: apache_beam is the `beam` extra)
from tfrecords import demo_images  # noqa: E402
from tfrecords.beam import planning  # noqa: E402
from tfrecords.run import conversion  # noqa: E402
from tfrecords.sources import folder as folder_module  # noqa: E402

SETTINGS = {"validation_fraction": 0.2, "test_fraction": 0.2, "num_shards": 3, "seed": 5, "max_side": 48,
            "jpeg_quality": 80, "max_skipped_fraction": 0.5}


def beam_options():
    return pipeline.make_pipeline_options(["--runner=FnApiRunner"])


def output_files(output_dir: str) -> dict:
    """Every file of a conversion but flags.txt (it names its folder), by name."""
    names = sorted(name for name in tf.io.gfile.listdir(output_dir) if name != "flags.txt")
    return {name: tf.io.gfile.GFile(tf.io.gfile.join(output_dir, name), "rb").read() for name in names}


def convert_both(source: conversion.Source, output_root: str) -> tuple:
    """(local converter's files, Beam converter's files) of one input."""
    local_dir, beam_dir = f"{output_root}/local", f"{output_root}/beam"
    conversion.build(source, local_dir, conversion.ConversionOptions(num_workers=1, **SETTINGS))
    manifest = pipeline.build_with_beam(source, beam_dir, conversion.ConversionOptions(**SETTINGS), beam_options())
    assert sum(split["num_examples"] for split in manifest["splits"].values()) >= 15
    local_files, beam_files = output_files(local_dir), output_files(beam_dir)
    assert sum(name.endswith(".tfrecord") for name in beam_files) >= 5  # 3 train shards, and validation and test
    return local_files, beam_files


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """3 classes x 10 demo images, a copy within a class, one in another class, and a file that is no image."""
    root = tmp_path_factory.mktemp("images")
    demo_images.write_demo_images(str(root), num_per_class=10, seed=4)
    original = (root / "circle" / "circle_001.jpg").read_bytes()
    (root / "circle" / "zcopy_001.jpg").write_bytes(original)
    (root / "square" / "also_001.jpg").write_bytes(original)
    (root / "triangle" / "readme.jpg").write_text("not an image\n")
    return root


def copy_to_ram(local: Path, remote: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            target = f"{remote}/{path.relative_to(local).as_posix()}"
            tf.io.gfile.makedirs(target.rsplit("/", 1)[0])
            with tf.io.gfile.GFile(target, "wb") as remote_file:
                remote_file.write(path.read_bytes())


def test_file_list_read_in_small_ranges_gives_the_local_converters_output(image_dir, tmp_path, monkeypatch):
    # Ranges of 40 bytes: most lines straddle a range boundary, and each must be read exactly once.
    monkeypatch.setattr(planning, "FILE_LIST_RANGE_BYTES", 40)
    remote = "ram://beam_plan_ranges/images"  # the workers read a remote input's list (a local one's: the launcher)
    copy_to_ram(image_dir, remote)
    paths = sorted(path.relative_to(image_dir).as_posix() for path in image_dir.rglob("*.jpg"))
    # Full paths, a repeated line, a note (a top-level name: ignored), a blank line and a byte-order mark.
    lines = [f"{remote}/{path}" for path in paths] + [paths[0], "# exported 2026-12-01", ""]
    file_list = tmp_path / "files.txt"
    file_list.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode("utf-8"))
    source = conversion.Source(input_dir=remote, file_list=str(file_list))
    listing = planning.make_listing(source, conversion.ConversionOptions(**SETTINGS), str(tmp_path / "plan"))
    # The launcher holds byte ranges, not paths.
    assert listing.kind == "file_list" and len(listing.items) == -(-file_list.stat().st_size // 40)

    local_files, beam_files = convert_both(source, "ram://beam_plan_ranges/output")
    assert local_files == beam_files
    assert b'"file_list"' in beam_files["manifest.json"] and b"duplicate of circle/circle_001.jpg" in beam_files["manifest.json"]


def test_csv_file_list_read_in_small_ranges_gives_the_local_converters_output(image_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(planning, "FILE_LIST_RANGE_BYTES", 30)  # the header and most rows straddle a boundary
    rows = [f'"{path.relative_to(image_dir).as_posix()}",{path.stat().st_size}' for path in sorted(image_dir.rglob("*.jpg"))]
    file_list = tmp_path / "files.csv"
    file_list.write_text("path,size\n" + "\n".join(rows) + "\n")
    copy_to_ram(image_dir, "ram://beam_plan_csv/images")
    source = conversion.Source(input_dir="ram://beam_plan_csv/images", file_list=str(file_list))
    local_files, beam_files = convert_both(source, "ram://beam_plan_csv/output")
    assert local_files == beam_files


def test_gs_like_folder_is_walked_by_the_workers_and_gives_the_local_converters_output(image_dir, tmp_path):
    remote = "ram://beam_plan_walk/images"
    copy_to_ram(image_dir, remote)
    source = conversion.Source(input_dir=remote)
    listing = planning.make_listing(source, conversion.ConversionOptions(**SETTINGS), "ram://beam_plan_walk/plan")
    # The launcher holds the class folders only.
    assert listing.kind == "roots" and [item[0] for item in listing.items] == ["circle", "square", "triangle"]

    local_files, beam_files = convert_both(source, "ram://beam_plan_walk/output")
    assert local_files == beam_files
    assert b'"label_conflicts": [\n    {\n      "paths": [\n        "circle/circle_001.jpg",\n        "square/also_001.jpg"' in beam_files["manifest.json"]


def test_pre_split_file_list_and_remote_pre_split_folder(tmp_path):
    local = tmp_path / "pre_split"
    for split, count in (("train", 6), ("val", 3)):
        demo_images.write_demo_images(str(local / split), num_per_class=count, seed=len(split))
    remote = "ram://beam_plan_pre_split/images"
    copy_to_ram(local, remote)
    local_files, beam_files = convert_both(conversion.Source(input_dir=remote), "ram://beam_plan_pre_split/walked")
    assert local_files == beam_files and b'"layout": "pre_split"' in beam_files["manifest.json"]

    file_list = tmp_path / "files.txt"
    file_list.write_text("\n".join(path.relative_to(local).as_posix() for path in sorted(local.rglob("*.jpg"))))
    local_files, beam_files = convert_both(
        conversion.Source(input_dir=str(local), file_list=str(file_list)), str(tmp_path / "listed")
    )
    assert local_files == beam_files and b'"layout": "pre_split"' in beam_files["manifest.json"]
    # The same list of the remote copy, read by the workers, with a loose file in train/: skipped with a reason.
    with tf.io.gfile.GFile(f"{remote}/train/loose.jpg", "wb") as loose:
        loose.write(b"x")
    with open(file_list, "a") as listed:
        listed.write("\ntrain/loose.jpg\n")
    local_files, beam_files = convert_both(
        conversion.Source(input_dir=remote, file_list=str(file_list)), "ram://beam_plan_pre_split/listed"
    )
    assert local_files == beam_files and folder_module.LOOSE_FILE_REASON.encode() in beam_files["manifest.json"]
    with open(file_list, "a") as listed:
        listed.write("test/1.jpg\n")  # a split folder of loose files only: refused by both, as walking refuses it
    for build in (lambda: conversion.build(conversion.Source(input_dir=remote, file_list=str(file_list)),
                                           "ram://beam_plan_pre_split/refused", conversion.ConversionOptions(**SETTINGS)),
                  lambda: pipeline.build_with_beam(conversion.Source(input_dir=remote, file_list=str(file_list)),
                                                        "ram://beam_plan_pre_split/refused_beam",
                                                        conversion.ConversionOptions(**SETTINGS), beam_options())):
        with pytest.raises(ValueError, match=r"looks pre-split but 'test/' has no class subfolders"):
            build()


@pytest.mark.parametrize("case", ["outside_path", "copies_only_class", "links_only_class"])
def test_refusals_come_before_any_shard_and_leave_nothing(image_dir, tmp_path, case):
    output_dir = tmp_path / "output"
    if case == "outside_path":
        file_list = tmp_path / "files.txt"
        file_list.write_text("circle/circle_000.jpg\n/elsewhere/cat.jpg\nsquare/square_000.jpg\n")
        source = conversion.Source(input_dir=str(image_dir), file_list=str(file_list))
        message = "--file_list"
    else:
        # A class whose every file is a copy of (or a link to) another class's: tfrecords.build refuses it, so
        # must Beam, with the same reason (the links are found by the listing, the copies by the planning job).
        folder = tmp_path / "copies"
        demo_images.write_demo_images(str(folder), num_per_class=3, seed=1)
        for path in sorted((folder / "square").iterdir()):
            if case == "copies_only_class":
                path.write_bytes((folder / "circle" / "circle_000.jpg").read_bytes())
            else:
                path.unlink()
                path.symlink_to(folder / "circle" / path.name.replace("square", "circle"))
        source = conversion.Source(input_dir=str(folder))
        message = "class 'square' would have 0 images: 3 of its entries are "
        with pytest.raises(conversion.InputError, match=message):
            conversion.build(source, str(tmp_path / "local"), conversion.ConversionOptions(num_workers=1, **SETTINGS))
    with pytest.raises(conversion.InputError, match=message) as raised:
        pipeline.build_with_beam(source, str(output_dir), conversion.ConversionOptions(**SETTINGS), beam_options())
    assert "\n" not in str(raised.value)
    assert not output_dir.exists()
    if case == "outside_path":
        assert "'/elsewhere/cat.jpg' is not inside --input_dir" in str(raised.value)


def test_a_file_list_of_odd_names_converts_as_the_walk_does_in_both_converters(image_dir, tmp_path, monkeypatch):
    """Classes starting with "#" or a space or named as the input folder, names holding U+2028, U+0085 or a
    carriage return, CRLF lines read in small byte ranges: the same shards as walking the folder."""
    import shutil

    monkeypatch.setattr(planning, "FILE_LIST_RANGE_BYTES", 40)
    names = {"circle": "#circle", "square": " square", "triangle": "col"}
    odd = tmp_path / "odd" / "col"  # the input folder has the name of a class
    for index, path in enumerate(sorted(image_dir.rglob("*.jpg"))):
        stem = ["a\u2028b", "c\u0085d", "e\rf", "#g", " h "][index % 5]
        target = odd / names[path.parent.name] / f"{stem}{index}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    lines = [path.relative_to(odd).as_posix() for path in sorted(odd.rglob("*.jpg"))]
    (tmp_path / "list.txt").write_bytes("\r\n".join(lines).encode("utf-8") + b"\r\n")
    monkeypatch.chdir(tmp_path / "odd")
    remote = "ram://beam_plan_odd/col"
    copy_to_ram(odd, remote)
    for input_dir, output in (("col", str(tmp_path)), (remote, "ram://beam_plan_odd/output")):  # listed here, by workers
        walked_files, _ = convert_both(conversion.Source(input_dir=input_dir), f"{output}/walked")
        local_files, beam_files = convert_both(conversion.Source(input_dir=input_dir, file_list="../list.txt"), output)
        assert local_files == beam_files
        assert json.loads(local_files["manifest.json"])["classes"] == [" square", "#circle", "col"]
        for name in walked_files:  # the manifest differs only by naming the list
            if name != "manifest.json":
                assert walked_files[name] == local_files[name], name
