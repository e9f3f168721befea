"""Fault injection: unusual but legal inputs, interrupted and concurrent runs, damaged data.

Each test injects one fault a user can meet and checks the tool's promise (README "What we guarantee"):
a one-line error and a non-zero exit, or a documented behaviour; never exit 0 with mislabelled, dropped
or deleted data. Converter cases call tfrecords.build directly or run its CLI; trainer cases run the CLIs.
"""

import io
import json
import os
import re
from pathlib import Path
import random
import shutil
import signal
import subprocess
import sys
import time

from PIL import Image
import pytest
import tensorflow as tf

from tests import entry_point_runs
from tests.conftest import REPO_ROOT
from tfrecords import schema
from tfrecords.run import conversion
from tfrecords.sources import folder
from tfrecords.writing import writer

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
    options = conversion.ConversionOptions(**{"num_workers": 1, **SETTINGS, **overrides})
    return conversion.build(conversion.Source(input_dir=str(input_dir)), str(output_dir), options)


def run_cli(module: str, *arguments: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *arguments], cwd=REPO_ROOT, env=ENVIRONMENT,
                          capture_output=True, text=True, timeout=timeout)


def error_lines(result: subprocess.CompletedProcess) -> list:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str, code: int = 2) -> None:
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
    with pytest.raises(conversion.InputError, match=r"class 'birds' would have 0 images: 2 of its entries are links"):
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
    convert(images, tmp_path / "out", max_skipped_fraction=0.5)
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
    with pytest.raises(conversion.InputError, match=r"cannot read folder 'dogs/locked' \(Permission denied\)"):
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
    with pytest.raises(conversion.InputError, match=r"is not empty \('_progress', 'labels.txt', .*not written by tfrecords.build"):
        convert(images, output, overwrite=True)
    assert tree(output) == before


def test_output_inside_input_and_input_inside_output_are_refused(tmp_path):
    images = make_classes(tmp_path / "images", {"cats": 2, "dogs": 2})
    with pytest.raises(conversion.InputError, match=r"is inside --input_dir"):
        convert(images, images / "tfrecords")
    with pytest.raises(conversion.InputError, match=r"--input_dir .* is inside --output_dir"):
        convert(images, tmp_path)
    assert sorted(path.name for path in images.iterdir()) == ["cats", "dogs"]


def test_overwrite_replaces_only_the_converters_own_files_and_only_once_the_new_conversion_succeeded(tmp_path):
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
    with pytest.raises(conversion.InputError, match=r"class 'dogs' would have 0 images"):
        convert(images, output, overwrite=True)
    assert tree(output) == finished
    make_classes(images, {"dogs": 3})
    # A rerun that fails only while decoding (too many undecodable files) must leave it intact too.
    (images / "dogs" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(conversion.TooManySkippedError):
        convert(images, output, overwrite=True, max_skipped_fraction=0.0)
    assert {name: data for name, data in tree(output).items() if not name.startswith("_replacement/")} == finished
    second = convert(images, output, overwrite=True, max_skipped_fraction=0.5)
    assert second["splits"]["train"]["class_counts"] == {"cats": 2, "dogs": 3} != first["splits"]["train"]["class_counts"]
    assert (output / "_progress" / "notes.txt").read_text() == "a user's file"
    assert (output / "README.md").read_text() == "a user's file"
    assert not (output / writer.REPLACEMENT_FOLDER).exists()
    assert sorted(path.name for path in output.iterdir()) == sorted(
        [".tfrecords_build", "README.md", "_progress", "labels.txt", "manifest.json", "train-00000-of-00001.tfrecord"]
    )


@pytest.mark.parametrize("name", ["$x^2$", "100%", "{braces}", "a\\b", "日本語", "with space", "-dash"])
def test_any_legal_folder_name_is_a_class_name_through_conversion(tmp_path, name):
    images = make_classes(tmp_path / "images", {name: 2, "plain": 2})
    manifest = convert(images, tmp_path / "out")
    assert manifest["classes"] == sorted([name, "plain"])
    assert (tmp_path / "out" / schema.LABELS_FILE).read_text().splitlines() == manifest["classes"]


# --- Training runs that must not train or export the wrong thing -------------------------------------

ODD_CLASS_NAMES = ["$x^$", "100% {a}", "日本語"]
TINY_TRAINING = [
    "--backbone=mobilenet_v2", "--weights=none", "--image_size=32", "--batch_size=8",
    "--epochs=1", "--fine_tune_epochs=1", "--steps_per_epoch=2",
]


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    """Three classes whose folder names matplotlib, CSV and shells find awkward; train/validation/test shards."""
    root = tmp_path_factory.mktemp("odd")
    images = make_classes(root / "images", {name: 12 for name in ODD_CLASS_NAMES})
    convert(images, root / "tfrecords", validation_fraction=0.25, test_fraction=0.25, num_shards=2)
    return root / "tfrecords"


@pytest.fixture(scope="module")
def trained(odd_data, tmp_path_factory) -> Path:
    model_dir = tmp_path_factory.mktemp("odd_model") / "model"
    result = run_cli("trainer.train", f"--data_dir={odd_data}", f"--model_dir={model_dir}", *TINY_TRAINING,
                     "--confusion_matrix_images")
    assert result.returncode == 0, result.stderr[-4000:]
    return model_dir


def copy_data(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def manifest_of(data_dir: Path) -> dict:
    return json.loads((data_dir / schema.MANIFEST_FILE).read_text())


def record_ends(path: Path) -> list:
    """Byte offsets where each TFRecord record ends (length, CRC, data, CRC)."""
    data, ends, offset = path.read_bytes(), [], 0
    while offset < len(data):
        offset += 8 + 4 + int.from_bytes(data[offset:offset + 8], "little") + 4
        ends.append(offset)
    return ends


@pytest.mark.xdist_group("odd_trained")
def test_odd_class_names_reach_every_output(trained, odd_data, tmp_path):
    names = sorted(ODD_CLASS_NAMES)
    assert (trained / "labels.txt").read_text(encoding="utf-8").splitlines() == names
    assert json.loads((trained / "evaluation.json").read_text())["class_names"] == names
    for png in ("confusion_matrix.png", "errors.png", "learning_curves.png"):
        assert (trained / png).stat().st_size > 0
    image = next((odd_data.parent / "images" / names[0]).iterdir())
    result = run_cli("trainer.predict", f"--model_dir={trained}", f"--output={tmp_path / 'predictions.csv'}", str(image))
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = (tmp_path / "predictions.csv").read_text(encoding="utf-8")
    assert any(name in predictions for name in names)
    # The TensorBoard confusion-matrix images of every epoch were drawn with these names too.
    assert list((trained / "logs" / "validation").glob("events.out.tfevents.*"))


# Each training below must stop with one error line before it trains (or, for damage found while reading, before it
# writes more than its identity). Their data are prepared by one function each, next to its test, and all of them run
# in one process of trainer.train (tests/entry_point_runs.py): a new interpreter each would cost seconds apiece.


def replaced(arguments: list, flags: list) -> list:
    """arguments with each of flags (--name=value) replacing the same flag's value."""
    for flag in flags:
        name = flag.split("=")[0]
        arguments = [argument for argument in arguments if not argument.startswith(name + "=")]
        arguments.append(flag)
    return arguments


def rerun_with_another_backbone(context: dict) -> list:
    return replaced(context["rerun"], ["--backbone=resnet50", "--image_size=48"])


def rerun_with_other_data(context: dict) -> list:
    return replaced(context["rerun"], [f"--data_dir={context['demo_data_dir']}"])


def training_of_a_shard_cut_at_a_record_boundary(context: dict) -> list:
    data = copy_data(context["odd_data"], context["folder"] / "data")
    shard = data / manifest_of(data)["splits"]["train"]["shards"][0]["file"]
    ends = record_ends(shard)
    # Before: every remaining record reads fine, so it trained on what was left, exit 0.
    shard.write_bytes(shard.read_bytes()[:ends[len(ends) // 2 - 1]])
    context["shard"] = shard.name
    return [f"--data_dir={data}", f"--model_dir={context['folder'] / 'model'}", *TINY_TRAINING]


def training_with_a_flipped_bit(context: dict) -> list:
    data = copy_data(context["odd_data"], context["folder"] / "data")
    shard = data / manifest_of(data)["splits"]["train"]["shards"][1]["file"]
    damaged = bytearray(shard.read_bytes())
    damaged[record_ends(shard)[0] + 100] ^= 0x10  # inside the second record's image bytes: same size
    shard.write_bytes(bytes(damaged))
    context["shard"] = shard.name
    return [f"--data_dir={data}", f"--model_dir={context['folder'] / 'model'}", *TINY_TRAINING]


def training_with_reordered_class_names(context: dict) -> list:
    data = copy_data(context["odd_data"], context["folder"] / "data")
    manifest = manifest_of(data)
    manifest["classes"] = manifest["classes"][::-1]
    (data / schema.MANIFEST_FILE).write_text(json.dumps(manifest))
    # Before: trained and exported with the names swapped. With labels.txt reordered the same way, only the
    # records' own class names give it away, while reading.
    (data / schema.LABELS_FILE).write_text("".join(name + "\n" for name in manifest["classes"]), encoding="utf-8")
    return [f"--data_dir={data}", f"--model_dir={context['folder'] / 'model'}", *TINY_TRAINING]


def training_at_a_too_small_image_size(context: dict) -> list:
    # Before, this ended in a traceback.
    arguments = [f"--data_dir={context['odd_data']}", f"--model_dir={context['folder'] / 'model'}", *TINY_TRAINING]
    return replaced(arguments, ["--image_size=16"])


def training_with_a_backbone_file_holding_code(context: dict) -> list:
    # Before, this ended in a traceback.
    arguments = [f"--data_dir={context['odd_data']}", f"--model_dir={context['folder'] / 'model'}", *TINY_TRAINING]
    return replaced(arguments, [f"--backbone={context['backbone_files']['with_code']}", "--preprocess=none",
                                "--weights=imagenet"])


def training_with_a_file_as_the_cache_folder(context: dict) -> list:
    # Before (issue 29's attack), a spill into it ended in a traceback, after phase 1's pass.
    (context["folder"] / "a_file").write_text("not a folder")
    arguments = [f"--data_dir={context['odd_data']}", f"--model_dir={context['folder'] / 'model'}", *TINY_TRAINING]
    return replaced(arguments, [f"--feature_cache_dir={context['folder'] / 'a_file' / 'spill'}"])


def training_with_a_fine_tune_at_beyond_the_backbone(context: dict) -> list:
    # Before (issue 29's attack), a ValueError traceback.
    arguments = [f"--data_dir={context['odd_data']}", f"--model_dir={context['folder'] / 'model'}", *TINY_TRAINING]
    return replaced(arguments, ["--fine_tune_at=999"])


REFUSED_TRAININGS = [
    rerun_with_another_backbone, rerun_with_other_data, training_of_a_shard_cut_at_a_record_boundary,
    training_with_a_flipped_bit, training_with_reordered_class_names, training_at_a_too_small_image_size,
    training_with_a_backbone_file_holding_code, training_with_a_file_as_the_cache_folder,
    training_with_a_fine_tune_at_beyond_the_backbone,
]


@pytest.fixture(scope="module")
def refused(trained, odd_data, demo_data_dir, backbone_files, tmp_path_factory) -> dict:
    """{case name: (its context, trainer.train's result)} for each of REFUSED_TRAININGS, run in one process."""
    shared = {"odd_data": odd_data, "demo_data_dir": demo_data_dir, "backbone_files": backbone_files,
              "trained_before": tree(trained),
              "rerun": [f"--data_dir={odd_data}", f"--model_dir={trained}", *TINY_TRAINING]}
    contexts = [{**shared, "folder": tmp_path_factory.mktemp(case.__name__)} for case in REFUSED_TRAININGS]
    argument_lists = [case(context) for case, context in zip(REFUSED_TRAININGS, contexts)]
    results = entry_point_runs.run_each("trainer.train", argument_lists)
    return {case.__name__: (context, result) for case, context, result in zip(REFUSED_TRAININGS, contexts, results)}


@pytest.mark.xdist_group("odd_trained")
@pytest.mark.parametrize("case, message", [
    (rerun_with_another_backbone, r"backbone was 'mobilenet_v2', now 'resnet50'.*image_size was 32, now 48"),
    (rerun_with_other_data, r"classes was \[.*\], now \['circle', 'square', 'triangle'\]"),
], ids=["another_backbone", "other_data"])
def test_rerun_with_another_model_or_data_stops_before_touching_anything(refused, trained, case, message):
    # Before: other data "resumed" the old checkpoint, trained nothing and wrote its class names over the
    # model; another backbone ended in a traceback after rewriting flags.txt.
    context, result = refused[case.__name__]
    assert_one_line_error(result, r"--model_dir '.*' holds another model \(.*" + message + r".*new --model_dir")
    assert tree(trained) == context["trained_before"]


@pytest.mark.xdist_group("odd_trained")
def test_a_shard_cut_at_a_record_boundary_stops_before_training(refused):
    context, result = refused["training_of_a_shard_cut_at_a_record_boundary"]
    assert_one_line_error(result, rf"shard {context['shard']} has \d+ bytes, the manifest says \d+.*python -m tfrecords.verify")
    assert not (context["folder"] / "model").exists()


@pytest.mark.parametrize("damage", ["cut_mid_record", "missing", "labels_reordered", "counts_changed"])
def test_data_that_differs_from_its_manifest_is_found_without_reading_it(odd_data, tmp_path, damage):
    from trainer.input import data as data_lib

    data = copy_data(odd_data, tmp_path / "data")
    manifest = manifest_of(data)
    shard = data / manifest["splits"]["train"]["shards"][0]["file"]
    if damage == "cut_mid_record":
        shard.write_bytes(shard.read_bytes()[:record_ends(shard)[0] + 20])
        pattern = rf"shard {shard.name} has \d+ bytes, the manifest says"
    elif damage == "missing":
        shard.unlink()
        pattern = rf"shard {shard.name} is missing"
    elif damage == "labels_reordered":
        (data / schema.LABELS_FILE).write_text("".join(name + "\n" for name in manifest["classes"][::-1]), encoding="utf-8")
        pattern = r"labels.txt lists .*, the manifest .* \(label ids would be swapped\)"
    else:
        manifest["splits"]["train"]["num_examples"] += 1
        pattern = r"the manifest's 'train' split counts disagree"
    with pytest.raises(ValueError, match=pattern + r".*python -m tfrecords.verify"):
        data_lib.check_data(str(data), manifest)


@pytest.mark.xdist_group("odd_trained")
def test_a_flipped_bit_stops_training_naming_the_shard(refused):
    context, result = refused["training_with_a_flipped_bit"]
    assert_one_line_error(
        result, rf"shard .*{context['shard']}: a record failed to read \(corrupted record at \d+\).*tfrecords.verify"
    )
    assert not (context["folder"] / "model" / "run.lock").exists()


@pytest.mark.xdist_group("odd_trained")
def test_reordered_class_names_never_train(refused):
    _, result = refused["training_with_reordered_class_names"]
    assert_one_line_error(result, r"shard .*\.tfrecord: record of '.*' has label \d for class '.*', but the manifest's")


def test_a_record_outside_the_manifests_classes_fails_while_reading(odd_data):
    from trainer.input import data as data_lib

    manifest = manifest_of(odd_data)
    fewer = manifest["classes"][:2]
    records = tf.data.TFRecordDataset(
        [str(odd_data / shard["file"]) for shard in manifest["splits"]["train"]["shards"]]
    ).map(lambda record: data_lib.parse_record(record, fewer))
    with pytest.raises(tf.errors.InvalidArgumentError, match=data_lib.RECORD_MISMATCH):
        for _ in records:
            pass
    # What trainer.train and trainer.evaluate print, as one line:
    pattern = r"shard .*train-0000\d-of-00002.tfrecord: record of '.*' has label 2 for class .*tfrecords.verify"
    with pytest.raises(data_lib.DataError, match=pattern):
        with data_lib.data_errors(str(odd_data), {**manifest, "classes": fewer}):
            for _ in records:
                pass


@pytest.mark.xdist_group("odd_trained")
def test_predict_checks_labels_against_the_models_own_class_names(trained, odd_data, tmp_path):
    # (trainer.evaluate's check of the data's classes against the model's: test_evaluate.)
    # A labels.txt that names the classes in another order than the SavedModel would rename predictions.
    model_dir = tmp_path / "model"
    shutil.copytree(trained, model_dir)
    names = sorted(ODD_CLASS_NAMES)
    swapped = names[1:] + names[:1]  # every class renamed
    (model_dir / "labels.txt").write_text("".join(name + "\n" for name in swapped), encoding="utf-8")
    image = next((odd_data.parent / "images" / ODD_CLASS_NAMES[0]).iterdir())
    result = run_cli("trainer.predict", f"--model_dir={model_dir}", str(image))
    assert_one_line_error(result, r"labels.txt calls class \d .* but the SavedModel calls it")


# --- Interrupted and concurrent training runs ------------------------------------------------------------

PHASE_2_TRAINING = [
    "--backbone=mobilenet_v2", "--weights=none", "--image_size=32", "--batch_size=8",
    "--epochs=2", "--fine_tune_epochs=6", "--steps_per_epoch=2",
    # A random backbone rarely beats its own best: adaptive fine-tuning would end phase 2 before the kill.
    "--fine_tune_patience=0",
]


def history_length(model_dir: Path) -> int:
    try:
        return len(json.loads((model_dir / "history.json").read_text()))
    except (OSError, ValueError):
        return 0


def test_concurrent_run_is_refused_and_a_kill_in_phase_2_resumes_to_the_end(demo_data_dir, tmp_path):
    model_dir = tmp_path / "model"
    command = [f"--data_dir={demo_data_dir}", f"--model_dir={model_dir}", *PHASE_2_TRAINING]
    first = subprocess.Popen([sys.executable, "-m", "trainer.train", *command], cwd=REPO_ROOT, env=ENVIRONMENT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (model_dir / "run.lock").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        # Before: a second run wrote the same model_dir at the same time.
        second = run_cli("trainer.train", *command)
        assert_one_line_error(second, r"is in use by another run \(host .*, pid \d+.*if that run is dead, delete")
        # kill -9 at a random point of phase 2 (epochs 3 to 8).
        kill_after = random.randint(3, 6)
        while history_length(model_dir) < kill_after and first.poll() is None and time.time() < deadline + 180:
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.5))
        assert first.poll() is None, "training ended before the kill"
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    killed_at = history_length(model_dir)
    assert killed_at >= 3 and (model_dir / "run.lock").exists()
    resumed = run_cli("trainer.train", *command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "taking over the lock of a dead run" in resumed.stdout
    assert "restored" in resumed.stderr and "phase2" in resumed.stderr
    first_epoch = int(re.search(r"Epoch (\d+)/8 \(phase2\)", resumed.stdout).group(1))
    assert 3 <= first_epoch <= killed_at + 1
    history = json.loads((model_dir / "metrics.json").read_text())["history"]
    assert [entry["epoch"] for entry in history] == list(range(1, 9))
    assert not (model_dir / "run.lock").exists()


# --- Bad training input: one error line, exit 2 ------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone_files(tmp_path_factory) -> dict:
    """Two tiny .keras feature extractors: one of standard layers, one with a Lambda layer (code)."""
    import keras

    folder_path = tmp_path_factory.mktemp("backbones")
    inputs = keras.Input((None, None, 3))
    standard = keras.Model(inputs, keras.layers.Conv2D(4, 3, strides=2)(inputs))
    standard.save(folder_path / "standard.keras")
    with_code = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(keras.layers.Conv2D(4, 3)(inputs)))
    with_code.save(folder_path / "with_code.keras")
    return {"standard": folder_path / "standard.keras", "with_code": folder_path / "with_code.keras"}


def test_weights_flag_with_a_backbone_file_is_refused(backbone_files):
    from trainer.models import classifier

    with pytest.raises(ValueError, match=r"--weights 'none' cannot apply to backbone file '.*standard.keras': it carries"):
        classifier.check_weights(f"mobilenet_v2+{backbone_files['standard']}", "none")
    classifier.check_weights(str(backbone_files["standard"]), "imagenet")


@pytest.mark.xdist_group("odd_trained")
@pytest.mark.parametrize("case, message", [
    (training_at_a_too_small_image_size, r"--backbone 'mobilenet_v2' cannot be built at --image_size 16: .*32"),
    (training_with_a_backbone_file_holding_code,
     r"--backbone file '.*with_code.keras' cannot be loaded: Keras safe mode refused it"),
    (training_with_a_file_as_the_cache_folder, r"--feature_cache_dir '.*a_file/spill': '.*a_file' is a file, not a folder"),
    (training_with_a_fine_tune_at_beyond_the_backbone, r"--fine_tune_at '999' is outside the backbone 'mobilenetv2.*'"),
], ids=["image_size_16", "backbone_with_code", "cache_folder_is_a_file", "fine_tune_at_beyond"])
def test_bad_model_input_is_a_one_line_error(refused, case, message):
    context, result = refused[case.__name__]
    assert_one_line_error(result, message)
    # At most the run's identity was written: nothing trained, and a corrected rerun may start anew.
    model_dir = context["folder"] / "model"
    assert not model_dir.exists() or sorted(path.name for path in model_dir.iterdir()) == ["flags.txt", "run.json"]
