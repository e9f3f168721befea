"""End to end conversion: tfrecords.build on generated folders, as a function and as a program."""

import io
import json
from pathlib import Path
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
import tensorflow as tf

from tests import entry_point_runs
from tfrecords import demo_images
from tfrecords import schema
from tfrecords.run import conversion
from tfrecords.sources import folder
from tfrecords.writing import plan
from tfrecords.writing import verification

REPO_ROOT = Path(__file__).resolve().parents[3]
CLASSES = ["circle", "square", "triangle"]
NUM_PER_CLASS = 12
MANIFEST_KEYS = [
    "format_version",
    "input_dir",
    "layout",
    "seed",
    "validation_fraction",
    "test_fraction",
    "max_side",
    "jpeg_quality",
    "image_format",
    "classes",
    "splits",
    "skipped",
    "label_conflicts",
]
# Files the converter must skip, with the start of the reason it must give.
BAD_FILES = {
    "circle/notes.jpg": "not an image",
    "square/empty.jpg": "empty file",
    "triangle/cut_in_half.jpg": "truncated or corrupt image",
}


def _build(input_dir, output_dir, **overrides) -> dict:
    settings = {
        "validation_fraction": 0.2,
        "test_fraction": 0.1,
        "num_shards": 2,
        "target_shard_mb": 100,
        "seed": 42,
        "overwrite": False,
        "max_skipped_fraction": 1.0,
        "num_workers": 1,
    }
    settings.update(overrides)
    source = conversion.Source(input_dir=str(input_dir), labels_csv=settings.pop("labels_csv", None),
                               file_list=settings.pop("file_list", None))
    return conversion.build(source, str(output_dir), conversion.ConversionOptions(**settings))


def _jpeg_bytes(color=(200, 30, 30), size=(40, 30)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def _read_examples(output_dir: Path, shard_file: str) -> list:
    dataset = tf.data.TFRecordDataset(str(output_dir / shard_file)).map(schema.parse_example)
    return list(dataset)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """A demo folder of 3 classes x 12 images, plus three bad files and a top-level LICENSE.txt."""
    root = tmp_path_factory.mktemp("images")
    demo_images.write_demo_images(str(root), num_per_class=NUM_PER_CLASS, seed=0)
    (root / "circle" / "notes.jpg").write_text("not an image\n")
    (root / "square" / "empty.jpg").write_bytes(b"")
    real_jpeg = (root / "triangle" / "triangle_000.jpg").read_bytes()
    (root / "triangle" / "cut_in_half.jpg").write_bytes(real_jpeg[: len(real_jpeg) // 2])
    (root / "LICENSE.txt").write_text("ignored: a plain file at the top level\n")
    return root


@pytest.fixture(scope="module")
def built(image_dir, tmp_path_factory) -> tuple:
    output_dir = tmp_path_factory.mktemp("tfrecords")
    return _build(image_dir, output_dir), output_dir


def test_manifest_structure(built, image_dir):
    manifest, output_dir = built
    assert list(manifest) == MANIFEST_KEYS
    assert json.loads((output_dir / schema.MANIFEST_FILE).read_text()) == manifest
    assert manifest["format_version"] == 1
    assert manifest["input_dir"] == str(image_dir)
    assert manifest["layout"] == "class_folders"
    assert (manifest["seed"], manifest["validation_fraction"], manifest["test_fraction"]) == (42, 0.2, 0.1)
    assert manifest["image_format"] == "jpeg"
    assert manifest["classes"] == CLASSES
    assert list(manifest["splits"]) == ["train", "validation", "test"]
    for split in manifest["splits"].values():
        assert list(split) == ["num_examples", "class_counts", "shards"]
        assert list(split["class_counts"]) == CLASSES
        assert sum(split["class_counts"].values()) == split["num_examples"]
        for shard in split["shards"]:
            assert list(shard) == ["file", "num_examples", "sha256", "size_bytes"]
            assert shard["size_bytes"] == (output_dir / shard["file"]).stat().st_size
    assert (output_dir / schema.LABELS_FILE).read_text() == "circle\nsquare\ntriangle\n"


def test_skipped_files_are_listed_with_reasons(built):
    manifest, _ = built
    assert [entry["path"] for entry in manifest["skipped"]] == sorted(BAD_FILES)
    for entry in manifest["skipped"]:
        assert entry["reason"].startswith(BAD_FILES[entry["path"]])
    converted = sum(split["num_examples"] for split in manifest["splits"].values())
    assert converted == len(CLASSES) * NUM_PER_CLASS


def test_shards_exist_are_balanced_and_decode(built, image_dir):
    manifest, output_dir = built
    sources = set()
    for split_name, split in manifest["splits"].items():
        assert [shard["file"] for shard in split["shards"]] == [
            schema.shard_name(split_name, index, 2) for index in range(2)
        ]
        sizes = [shard["num_examples"] for shard in split["shards"]]
        assert sum(sizes) == split["num_examples"]
        # Shards are assigned before decoding: a skipped file leaves its shard one example shorter.
        assert max(sizes) - min(sizes) <= 1 + len(BAD_FILES)
        for shard in split["shards"]:
            examples = _read_examples(output_dir, shard["file"])
            assert len(examples) == shard["num_examples"]
            for example in examples:
                class_name = example["image/class/text"].numpy().decode()
                source = example["image/source"].numpy().decode()
                assert int(example["image/class/label"]) == CLASSES.index(class_name)
                assert source.startswith(f"{class_name}/")
                image = tf.io.decode_jpeg(example["image/encoded"], channels=3)
                assert image.shape == (int(example["image/height"]), int(example["image/width"]), 3)
                # The split of each file is the documented hash of seed and path.
                assert split_name == folder.assign_split(
                    relative_path=source, seed=42, validation_fraction=0.2, test_fraction=0.1
                )
                sources.add(source)
    expected = {p.relative_to(image_dir).as_posix() for p in image_dir.glob("*/*")} - set(BAD_FILES)
    assert sources == expected
    assert not list(output_dir.glob("*.incomplete"))
    assert not (output_dir / "_progress").exists()
    assert verification.verify(data_dir=str(output_dir)) == ([], 6, len(sources))


def test_splits_are_stable_whatever_the_listing(image_dir, tmp_path):
    larger_dir = tmp_path / "larger"
    shutil.copytree(image_dir, larger_dir)
    demo_images.write_demo_images(str(larger_dir / "more"), num_per_class=3, seed=1)

    def splits_by_path(input_dir, seed):
        listing = folder.list_images(
            input_dir=str(input_dir), validation_fraction=0.2, test_fraction=0.1, seed=seed
        )
        return {source_file.relative_path: source_file.split for source_file in listing.files}

    original = splits_by_path(image_dir, seed=42)
    larger = splits_by_path(larger_dir, seed=42)
    assert {path: larger[path] for path in original} == original
    assert splits_by_path(image_dir, seed=7) != original

    # The example order inside shards does not depend on the order files were listed in either.
    listing = folder.list_images(
        input_dir=str(image_dir), validation_fraction=0.2, test_fraction=0.1, seed=42
    )
    shuffled = list(listing.files)
    random.Random(0).shuffle(shuffled)
    assert plan.order_files(files=shuffled, seed=42) == plan.order_files(files=listing.files, seed=42)


def test_automatic_shard_count():
    def count(num_files, total_mb, num_shards=0):
        return plan.count_shards(
            num_files=num_files, total_bytes=int(total_mb * 2**20), num_shards=num_shards, target_shard_mb=100
        )

    assert count(36, 1) == 1
    assert count(36, 450) == 5
    assert count(36, 450, num_shards=3) == 3
    # Never more shards than files: no shard is empty on purpose.
    assert count(2, 1, num_shards=10) == 2


def test_pre_split_layout(tmp_path):
    input_dir = tmp_path / "images"
    for split_folder, num_per_class, seed in [("train", 4, 0), ("val", 2, 1), ("test", 1, 2)]:
        demo_images.write_demo_images(str(input_dir / split_folder), num_per_class=num_per_class, seed=seed)
    manifest = _build(input_dir, tmp_path / "output", num_shards=0)
    assert manifest["layout"] == "pre_split"
    assert manifest["classes"] == CLASSES
    counts = {name: split["num_examples"] for name, split in manifest["splits"].items()}
    assert counts == {"train": 12, "validation": 6, "test": 3}
    assert manifest["splits"]["validation"]["shards"][0]["file"] == "validation-00000-of-00001.tfrecord"
    examples = _read_examples(tmp_path / "output", "validation-00000-of-00001.tfrecord")
    assert all(example["image/source"].numpy().startswith(b"val/") for example in examples)


def test_refuses_to_overwrite_and_replaces_with_overwrite(image_dir, tmp_path):
    output_dir = tmp_path / "output"
    _build(image_dir, output_dir, num_shards=2)
    with pytest.raises(ValueError, match=r"--output_dir .* already holds a conversion .* pass --overwrite"):
        _build(image_dir, output_dir, num_shards=1)
    assert (output_dir / "train-00001-of-00002.tfrecord").exists()

    manifest = _build(image_dir, output_dir, num_shards=1, overwrite=True)
    assert manifest["splits"]["train"]["shards"][0]["file"] == "train-00000-of-00001.tfrecord"
    # Shards of the earlier conversion are gone, so a glob of the folder finds only the new ones.
    assert sorted(path.name for path in output_dir.glob("*.tfrecord")) == [
        "test-00000-of-00001.tfrecord",
        "train-00000-of-00001.tfrecord",
        "validation-00000-of-00001.tfrecord",
    ]


def test_folder_of_only_bad_files_is_refused_without_a_manifest(tmp_path):
    for class_name in ("cats", "dogs"):
        (tmp_path / "images" / class_name).mkdir(parents=True)
        (tmp_path / "images" / class_name / "readme.jpg").write_text(f"not an image of {class_name}\n")
    with pytest.raises(conversion.TooManySkippedError, match=r"2 of 2 files \(100.0%\) could not be decoded"):
        _build(tmp_path / "images", tmp_path / "output", validation_fraction=0.0, test_fraction=0.0,
               max_skipped_fraction=0.01)
    assert not (tmp_path / "output" / schema.MANIFEST_FILE).exists()
    # Even when skipping is allowed, a class with no image left is an error, not an empty split.
    with pytest.raises(conversion.TooManySkippedError, match=r"class 'cats' has no decodable image left.*cats/readme.jpg"):
        _build(tmp_path / "images", tmp_path / "output", validation_fraction=0.0, test_fraction=0.0)
    assert not (tmp_path / "output" / schema.MANIFEST_FILE).exists()


def test_copies_of_one_class_in_another_leave_it_empty_and_are_refused(tmp_path):
    for class_name in ("cats", "dogs"):
        (tmp_path / "images" / class_name).mkdir(parents=True)
        # Identical files: the dogs' copy would be skipped as a duplicate of the cat, leaving dogs empty.
        (tmp_path / "images" / class_name / "same.jpg").write_bytes(_jpeg_bytes())
    with pytest.raises(conversion.InputError, match=r"class 'dogs' would have 0 images: 1 of its entries are links to or copies"):
        _build(tmp_path / "images", tmp_path / "output", validation_fraction=0.0, test_fraction=0.0)
    assert not (tmp_path / "output").exists()


def _run_build(*flags) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tfrecords.build", *flags],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_program_converts_and_prints_summary(image_dir, tmp_path):
    output_dir = tmp_path / "output"
    result = _run_build(
        f"--input_dir={image_dir}", f"--output_dir={output_dir}", "--num_shards=1", "--max_skipped_fraction=0.1"
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((output_dir / schema.MANIFEST_FILE).read_text())
    counts = ", ".join(f"{name} {split['num_examples']}" for name, split in manifest["splits"].items())
    converted = len(CLASSES) * NUM_PER_CLASS
    summary = f"converted {converted}, skipped 3 (see {output_dir}/manifest.json): {counts}"
    assert result.stdout.strip() == summary
    assert f"--input_dir={image_dir}\n" in (output_dir / "flags.txt").read_text()


def _make_missing(tmp_path):
    return tmp_path / "missing"


def _make_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _make_single_class(tmp_path):
    demo_images.write_demo_images(str(tmp_path / "all"), num_per_class=1)
    shutil.rmtree(tmp_path / "all" / "square")
    shutil.rmtree(tmp_path / "all" / "triangle")
    return tmp_path / "all"


INPUT_ERRORS = [
    (_make_missing, "does not exist or is not a folder"),
    (_make_empty, "has no class subfolders"),
    (_make_single_class, "has only one class folder ('circle')"),
]


@pytest.fixture(scope="module")
def input_error_runs(tmp_path_factory) -> list:
    """(folder, input_dir, result) of tfrecords.build for each of INPUT_ERRORS, all in one process (tests/entry_point_runs.py)."""
    folders = [tmp_path_factory.mktemp("input_error") for _ in INPUT_ERRORS]
    input_dirs = [make_input_dir(folder) for folder, (make_input_dir, _) in zip(folders, INPUT_ERRORS)]
    argument_lists = [
        [f"--input_dir={input_dir}", f"--output_dir={folder / 'output'}"] for folder, input_dir in zip(folders, input_dirs)
    ]
    return list(zip(folders, input_dirs, entry_point_runs.run_each("tfrecords.build", argument_lists)))


@pytest.mark.parametrize("case", range(len(INPUT_ERRORS)), ids=["missing", "empty", "single_class"])
def test_program_input_errors_exit_2_with_one_line(input_error_runs, case):
    folder, input_dir, result = input_error_runs[case]
    message = INPUT_ERRORS[case][1]
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert error_lines[0].startswith(f"error: --input_dir {str(input_dir)!r} {message}")
    assert "Traceback" not in result.stderr
    assert not (folder / "output").exists()


def test_tfds_source_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        manifest = conversion.build(
            conversion.Source(tfds_name="tf_flowers"), str(tmp_path / "output"),
            conversion.ConversionOptions(validation_fraction=0.2, test_fraction=0.1, num_shards=2, max_side=16, num_workers=1),
        )
    assert manifest["layout"] == "tfds" and manifest["tfds_name"] == "tf_flowers"
    assert manifest["tfds_splits"] == {"train": "train[30%:]", "validation": "train[10%:30%]", "test": "train[:10%]"}
    assert manifest["classes"] == ["dandelion", "daisy", "tulips", "sunflowers", "roses"]
    # The mock ignores slicing: each of the 2 shards of each split gets the 6 mock examples.
    assert {name: split["num_examples"] for name, split in manifest["splits"].items()} == {
        "train": 12, "validation": 12, "test": 12
    }
    problems, num_shards, num_examples = verification.verify(data_dir=str(tmp_path / "output"))
    assert (problems, num_shards, num_examples) == ([], 6, 36)
    for serialized in tf.data.TFRecordDataset(str(tmp_path / "output" / "train-00000-of-00002.tfrecord")):
        assert max(int(schema.parse_example(serialized)["image/height"]), 1) <= 16


def test_duplicates_are_skipped_and_label_conflicts_reported(image_dir, tmp_path):
    input_dir = tmp_path / "images"
    shutil.copytree(image_dir, input_dir)
    original = (input_dir / "circle" / "circle_000.jpg").read_bytes()
    (input_dir / "circle" / "copy_of_000.jpg").write_bytes(original)  # same class
    (input_dir / "square" / "also_000.jpg").write_bytes(original)  # another class
    manifest = _build(input_dir, tmp_path / "output")
    reasons = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    # The first copy by relative path is kept, whatever the listing order.
    assert reasons["circle/copy_of_000.jpg"] == "duplicate of circle/circle_000.jpg"
    assert reasons["square/also_000.jpg"] == "duplicate of circle/circle_000.jpg"
    assert manifest["label_conflicts"] == [
        {"paths": ["circle/circle_000.jpg", "square/also_000.jpg"], "classes": ["circle", "square"]}
    ]
    assert sum(split["num_examples"] for split in manifest["splits"].values()) == len(CLASSES) * NUM_PER_CLASS


def test_labels_csv(image_dir, tmp_path):
    rows = ["path,label"] + [f"circle/circle_{index:03d}.jpg,round" for index in range(6)]
    rows += [f"square/./square_{index:03d}.jpg,angular" for index in range(6)]
    # Excel saves CSVs with a UTF-8 byte-order mark: it must not turn the header into a class.
    (tmp_path / "labels.csv").write_bytes(("\n".join(rows) + "\n").encode("utf-8-sig"))
    manifest = _build(image_dir, tmp_path / "output", labels_csv=str(tmp_path / "labels.csv"), num_shards=1)
    assert manifest["layout"] == "labels_csv"
    assert manifest["classes"] == ["angular", "round"]
    assert sum(split["num_examples"] for split in manifest["splits"].values()) == 12
    assert manifest["skipped"] == []
    sources = {example["image/source"].numpy().decode() for example in _read_examples(tmp_path / "output", "train-00000-of-00001.tfrecord")}
    assert "square/./square_000.jpg" not in sources and any(source.startswith("square/square_") for source in sources)
    # A row naming a file that is not there is an input error, before anything is written.
    (tmp_path / "missing.csv").write_text("\n".join(rows + ["missing.jpg,angular"]) + "\n")
    with pytest.raises(conversion.InputError, match=r"names 1 files that are not in --input_dir .*'missing.jpg'"):
        _build(image_dir, tmp_path / "other", labels_csv=str(tmp_path / "missing.csv"))
    assert not (tmp_path / "other").exists()
    (tmp_path / "bad.csv").write_text("../outside.jpg,round\n")
    with pytest.raises(ValueError, match=r"path '../outside.jpg' leaves --input_dir"):
        _build(image_dir, tmp_path / "other", labels_csv=str(tmp_path / "bad.csv"))


def test_max_side_downscales_keeping_aspect(image_dir, tmp_path):
    manifest = _build(image_dir, tmp_path / "output", max_side=40)
    assert manifest["max_side"] == 40
    assert manifest["jpeg_quality"] == 90
    for split in manifest["splits"].values():
        for example in _read_examples(tmp_path / "output", split["shards"][0]["file"]):
            height, width = int(example["image/height"]), int(example["image/width"])
            assert max(height, width) <= 40
            assert tf.io.decode_jpeg(example["image/encoded"]).shape[:2] == (height, width)


def test_by_default_only_images_over_1024_px_are_downscaled_and_0_keeps_every_byte(tmp_path):
    rng = np.random.default_rng(3)
    originals = {}
    for class_name, (height, width) in (("large", (1200, 1600)), ("small", (300, 400))):
        (tmp_path / "input" / class_name).mkdir(parents=True)
        for index in range(2):
            encoded = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(encoded, "JPEG", quality=90)
            (tmp_path / "input" / class_name / f"{index}.jpg").write_bytes(encoded.getvalue())
            originals[f"{class_name}/{index}.jpg"] = encoded.getvalue()
    for max_side, expected in ((None, {"large": (768, 1024), "small": (300, 400)}),
                               (0, {"large": (1200, 1600), "small": (300, 400)})):
        overrides = {} if max_side is None else {"max_side": max_side}
        output = tmp_path / f"output_{max_side}"
        manifest = _build(tmp_path / "input", output, validation_fraction=0.0, test_fraction=0.0, num_shards=1, **overrides)
        assert manifest["max_side"] == (conversion.DEFAULT_MAX_SIDE if max_side is None else 0) and manifest["skipped"] == []
        for example in _read_examples(output, manifest["splits"]["train"]["shards"][0]["file"]):
            class_name = example["image/class/text"].numpy().decode()
            assert (int(example["image/height"]), int(example["image/width"])) == expected[class_name]
            if expected[class_name] != (768, 1024):  # kept: the original bytes, not a re-encoding
                assert example["image/encoded"].numpy() == originals[example["image/source"].numpy().decode()]
    assert conversion.DEFAULT_MAX_SIDE == 1024


def test_a_file_list_converts_to_the_same_shards_and_skips_a_listed_file_that_is_gone(image_dir, tmp_path):
    walked = _build(image_dir, tmp_path / "walked")
    names = sorted(path.relative_to(image_dir).as_posix() for path in image_dir.rglob("*") if path.is_file())
    (tmp_path / "list.txt").write_text("\n".join(names + ["circle/deleted_since_the_inventory.jpg"]) + "\n")
    listed = _build(image_dir, tmp_path / "listed", file_list=str(tmp_path / "list.txt"))
    for split, info in walked["splits"].items():
        assert [shard["sha256"] for shard in listed["splits"][split]["shards"]] == [shard["sha256"] for shard in info["shards"]]
    gone = [entry for entry in listed["skipped"] if entry["path"] == "circle/deleted_since_the_inventory.jpg"]
    assert gone == [{"path": "circle/deleted_since_the_inventory.jpg", "reason": "named in --file_list but not in --input_dir"}]
    assert [entry for entry in listed["skipped"] if entry not in gone] == walked["skipped"]
    assert listed["file_list"] == str(tmp_path / "list.txt") and "file_list" not in walked


def test_a_new_jpeg_quality_rewrites_the_shards(image_dir, tmp_path):
    # The quality is part of each shard's fingerprint: a rerun must not keep shards of the old quality.
    _build(image_dir, tmp_path / "output", max_side=40, num_shards=1)
    before = (tmp_path / "output" / "train-00000-of-00001.tfrecord").stat().st_size
    manifest = _build(image_dir, tmp_path / "output", max_side=40, num_shards=1, jpeg_quality=30, overwrite=True)
    assert manifest["jpeg_quality"] == 30
    assert (tmp_path / "output" / "train-00000-of-00001.tfrecord").stat().st_size < before


ODD_IMAGES_DIR = Path(__file__).resolve().parents[4] / "shared" / "data" / "odd_images"


@pytest.mark.skipif(not ODD_IMAGES_DIR.is_dir(), reason=f"{ODD_IMAGES_DIR} is absent")
def test_every_odd_image_is_converted_or_skipped_with_a_reason(tmp_path):
    # tests/test_images.py says what each file becomes; here they go through the whole converter.
    from tests.tfrecords.writing.test_images import CONVERTED, KEPT, ODD_IMAGES

    for index, name in enumerate(sorted(ODD_IMAGES)):
        (tmp_path / "images" / ("a", "b")[index % 2]).mkdir(parents=True, exist_ok=True)
        shutil.copy(ODD_IMAGES_DIR / name, tmp_path / "images" / ("a", "b")[index % 2] / name)
    manifest = _build(tmp_path / "images", tmp_path / "output", validation_fraction=0.0, test_fraction=0.0)
    skipped = {entry["path"].split("/")[1]: entry["reason"] for entry in manifest["skipped"]}
    expected_skipped = {name: reason for name, reason in ODD_IMAGES.items() if reason not in (KEPT, CONVERTED)}
    assert sorted(skipped) == sorted(expected_skipped)
    assert all(skipped[name].startswith(reason) for name, reason in expected_skipped.items())
    assert manifest["splits"]["train"]["num_examples"] == len(ODD_IMAGES) - len(expected_skipped)
    assert verification.verify(data_dir=str(tmp_path / "output"))[0] == []


def test_ram_filesystem_input_and_output(image_dir):
    # ram:// goes through the same tf.io.gfile calls as gs://, without a network.
    for path in image_dir.glob("*/*.*"):
        relative = path.relative_to(image_dir).as_posix()
        tf.io.gfile.makedirs(f"ram://images/{relative.split('/')[0]}")
        tf.io.gfile.copy(str(path), f"ram://images/{relative}", overwrite=True)
    manifest = _build("ram://images", "ram://output", num_shards=1)
    assert sum(split["num_examples"] for split in manifest["splits"].values()) == len(CLASSES) * NUM_PER_CLASS
    assert tf.io.gfile.exists("ram://output/manifest.json")
    assert verification.verify(data_dir="ram://output")[0] == []


FLAG_ERRORS = [
    ("--max_side=-1", "error: --max_side=-1 is negative"),
    ("--jpeg_quality=100", "error: --jpeg_quality=100 is not in [1, 95]"),
    ("--num_workers=-2", "error: --num_workers=-2 is negative"),
    ("--max_skipped_fraction=2", "error: --max_skipped_fraction=2.0 is not in [0, 1]"),
    ("--num_shards=-1", "error: --num_shards=-1 is negative"),
    ("--file_list=/no/such/inventory.txt", "error: --file_list '/no/such/inventory.txt' does not exist"),
]


@pytest.fixture(scope="module")
def flag_error_runs(built, image_dir) -> tuple:
    """The earlier output's files, tfrecords.build's result for each of FLAG_ERRORS (one process), the files after."""
    _, output_dir = built
    before = {path.name: path.read_bytes() for path in output_dir.iterdir()}
    results = entry_point_runs.run_each("tfrecords.build", [
        [f"--input_dir={image_dir}", f"--output_dir={output_dir}", "--overwrite", flag] for flag, _ in FLAG_ERRORS
    ])
    return before, results, {path.name: path.read_bytes() for path in output_dir.iterdir()}


@pytest.mark.parametrize("case", range(len(FLAG_ERRORS)), ids=[flag for flag, _ in FLAG_ERRORS])
def test_program_flag_errors_exit_2_and_keep_earlier_output(flag_error_runs, case):
    before, results, after = flag_error_runs
    result, message = results[case], FLAG_ERRORS[case][1]
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        line for line in result.stderr.splitlines() if line.startswith(message)
    ] != []
    assert "Traceback" not in result.stderr
    assert after == before


def test_verify_program_finds_a_corrupt_shard(image_dir, tmp_path):
    output_dir, corrupt_dir = tmp_path / "output", tmp_path / "corrupt"
    _build(image_dir, output_dir)
    shutil.copytree(output_dir, corrupt_dir)
    shard = corrupt_dir / "train-00000-of-00002.tfrecord"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    intact, corrupt = entry_point_runs.run_each(
        "tfrecords.verify", [[f"--data_dir={output_dir}"], [f"--data_dir={corrupt_dir}"]]
    )
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.strip().endswith(": OK")
    assert corrupt.returncode == 1
    assert "problem: train-00000-of-00002.tfrecord: sha256 differs from the manifest" in corrupt.stdout
    assert "FAILED" in corrupt.stdout.splitlines()[-1]


def test_a_file_list_of_a_remote_input_names_an_object_that_is_gone(image_dir, tmp_path):
    names = []
    for path in sorted(image_dir.glob("*/*.*")):
        relative = path.relative_to(image_dir).as_posix()
        tf.io.gfile.makedirs(f"ram://listed_images/{relative.split('/')[0]}")
        tf.io.gfile.copy(str(path), f"ram://listed_images/{relative}", overwrite=True)
        names.append(f"ram://listed_images/{relative}")
    (tmp_path / "inventory.txt").write_text("\n".join(names + ["ram://listed_images/square/gone.jpg"]) + "\n")
    manifest = _build("ram://listed_images", "ram://listed_output", num_shards=1, file_list=str(tmp_path / "inventory.txt"))
    assert sum(split["num_examples"] for split in manifest["splits"].values()) == len(CLASSES) * NUM_PER_CLASS
    gone = [entry for entry in manifest["skipped"] if entry["path"] == "square/gone.jpg"]
    assert len(gone) == 1 and gone[0]["reason"].startswith("cannot read file"), manifest["skipped"]


def test_a_flag_value_absl_cannot_read_is_one_error_line_and_exit_2(tmp_path):
    result = _run_build(f"--input_dir={tmp_path}", f"--output_dir={tmp_path / 'output'}", "--num_shards=many")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: flag --num_shards=many: invalid literal")
    assert "FATAL" not in result.stderr and not (tmp_path / "output").exists()
