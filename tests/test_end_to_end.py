"""The real CLIs as subprocesses: image folder -> tfrecords.build -> trainer.train -> SavedModel -> predict."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import entry_point_runs
from tests.conftest import FLOWERS_DIR, LITE0_BACKBONE, REPO_ROOT
from trainer.exports import export
from trainer.models import classifier

ENVIRONMENT = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO_ROOT)}
TINY_TRAINING = [
    "--backbone=mobilenet_v2", "--weights=none", "--image_size=32", "--batch_size=8",
    "--epochs=1", "--fine_tune_epochs=1", "--steps_per_epoch=2",
]


def run_cli(module: str, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", module, *arguments], cwd=REPO_ROOT, env=ENVIRONMENT,
        capture_output=True, text=True, timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{module} exited {result.returncode}:\n{result.stdout}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def converted(demo_image_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("e2e") / "tfrecords"
    result = run_cli("tfrecords.build", f"--input_dir={demo_image_dir}", f"--output_dir={output_dir}", "--num_shards=2")
    assert "converted 60, skipped 0" in result.stdout
    return output_dir


def test_converter_output(converted):
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["classes"] == ["circle", "square", "triangle"]
    assert (converted / "labels.txt").read_text().split() == manifest["classes"]
    total = 0
    for split, info in manifest["splits"].items():
        names = sorted(shard["file"] for shard in info["shards"])
        assert names == [f"{split}-00000-of-00002.tfrecord", f"{split}-00001-of-00002.tfrecord"]
        records = sum(1 for name in names for _ in tf.data.TFRecordDataset(str(converted / name)))
        assert records == info["num_examples"] == sum(info["class_counts"].values())
        total += records
    assert total == 60


def serve_file(model_dir: Path, image: Path) -> str:
    serve = export.load_serving_function(str(model_dir / export.SAVED_MODEL_DIR))
    outputs = serve(image_bytes=tf.constant([image.read_bytes()]))
    return outputs["class_names"].numpy()[0].decode()


ONNX_INSTALLED = all(importlib.util.find_spec(name) for name in ("tf2onnx", "onnx", "onnxruntime"))
EVERY_EXPORT = ["--export_tflite=float,int8", "--tflite_calibration_images=8", *(["--export_onnx"] * ONNX_INSTALLED)]


@pytest.fixture(scope="module")
def trained(converted, tmp_path_factory) -> tuple:
    """One tiny run of the real command with every export, shared by the tests of what a run leaves behind."""
    model_dir = tmp_path_factory.mktemp("trained") / "model"
    command = [f"--data_dir={converted}", f"--model_dir={model_dir}", *TINY_TRAINING, *EVERY_EXPORT]
    result = run_cli("trainer.train", *command)
    return model_dir, command, result, json.loads((model_dir / "metrics.json").read_text())


@pytest.mark.xdist_group("e2e_trained")
def test_a_run_prints_and_writes_its_results(trained):
    model_dir, _, first, metrics = trained
    assert re.search(r"test accuracy \d\.\d{4} on \d+ images \(95% interval 0\.\d{3}-[01]\.\d{3}\)", first.stdout)
    # Where the time went, printed and in metrics.json: every stage of this run, and the rest.
    assert "where the time went" in first.stdout
    times = metrics["time_seconds"]
    for stage in ("data-quality report", "phase1: caching backbone features", "phase1: training and validation",
                  "phase2: training and validation", "export", "other", "total"):
        assert stage in times, stage
    assert sum(value for name, value in times.items() if name != "total") == pytest.approx(times["total"], abs=0.5)
    assert metrics["evaluated_split"] == "test" and metrics["num_replicas"] == 1
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert [(entry["epoch"], entry["phase"]) for entry in metrics["history"]] == [(1, "phase1"), (2, "phase2")]
    assert all(0.0 <= entry["input_wait_fraction"] <= 1.0 for entry in metrics["history"])
    assert (model_dir / "labels.txt").read_text().split() == ["circle", "square", "triangle"]
    assert "--backbone=mobilenet_v2" in (model_dir / "flags.txt").read_text()
    assert (model_dir / "model.keras").exists() and list((model_dir / "checkpoints").glob("best_epoch_*.weights.h5"))
    assert list((model_dir / "logs" / "train").glob("events.out.tfevents.*"))
    # The evaluation report written at the end of training agrees with metrics.json.
    evaluation = json.loads((model_dir / "evaluation.json").read_text())
    assert evaluation["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert evaluation["num_examples"] == metrics["num_examples"]
    assert set(metrics["phases"]) == {"phase1", "phase2"}
    for name in ("confusion_matrix.png", "errors.png", "learning_curves.png", "evaluation.txt", "data_quality.png"):
        assert (model_dir / name).stat().st_size > 0
    # The data-quality report covers every image, and its summary is printed before the accuracy line.
    quality_report = json.loads((model_dir / "data_quality.json").read_text())
    assert quality_report["num_images"] == 60
    assert "data quality of 60 images: " in first.stdout


@pytest.mark.xdist_group("e2e_trained")
def test_the_data_quality_report_alone_from_a_trained_model(trained, converted, tmp_path):
    model_dir = trained[0]
    # On its own, the same report from the trained model (into another folder).
    alone = run_cli("trainer.data_quality", f"--data_dir={converted}", f"--model_dir={model_dir}",
                    f"--output_dir={tmp_path / 'quality'}")
    assert alone.stdout.startswith("data quality of 60 images: ")
    assert json.loads((tmp_path / "quality" / "data_quality.json").read_text())["num_images"] == 60


@pytest.mark.xdist_group("e2e_trained")
def test_the_saved_model_and_predict_label_image_files(trained, demo_image_dir):
    model_dir = trained[0]
    image = sorted((demo_image_dir / "square").glob("*.jpg"))[0]
    assert serve_file(model_dir, image) in ["circle", "square", "triangle"]
    predicted = run_cli("trainer.predict", f"--model_dir={model_dir}", str(image), str(demo_image_dir / "circle"))
    header, *lines = predicted.stdout.strip().splitlines()
    assert header.split()[:3] == ["path", "class_name", "probability"] and len(lines) == 1 + 20
    path, class_name, probability = lines[0].split()[:3]
    assert path == str(image) and class_name in ["circle", "square", "triangle"] and 0 < float(probability) <= 1


def test_mirrored_over_two_logical_cpus_in_mixed_precision(converted, tmp_path):
    model_dir = tmp_path / "model"
    run_cli(
        "trainer.train", f"--data_dir={converted}", f"--model_dir={model_dir}", *TINY_TRAINING,
        "--strategy=mirrored", "--num_cpu_devices=2", "--precision=mixed_bfloat16",
    )
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["num_replicas"] == 2
    # The evaluation report, collected from both replicas' shares of the evaluation pass, counts every image once.
    report = json.loads((model_dir / "evaluation.json").read_text())
    assert report["num_examples"] == metrics["num_examples"] == sum(map(sum, report["confusion_matrix"]))
    assert report["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert (model_dir / export.SAVED_MODEL_DIR / "saved_model.pb").exists()


LONG_EPOCHS = 12  # long enough to be killed at epoch 2 or 3 with epochs left to resume
LONG_TRAINING = [
    "--backbone=mobilenet_v2", "--weights=none", "--image_size=32", "--batch_size=8",
    f"--epochs={LONG_EPOCHS}", "--fine_tune_epochs=0", "--steps_per_epoch=2",
]


def start_training(converted, model_dir) -> subprocess.Popen:
    command = [sys.executable, "-m", "trainer.train", f"--data_dir={converted}", f"--model_dir={model_dir}", *LONG_TRAINING]
    # SIGINT as a terminal delivers it: pytest-xdist's workers ignore SIGINT, and an ignored signal is inherited
    # (Python then installs no KeyboardInterrupt handler), so the child gets the default disposition back.
    return subprocess.Popen(command, cwd=REPO_ROOT, env=ENVIRONMENT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_epochs(process: subprocess.Popen, model_dir: Path, count: int) -> None:
    """Waits until history.json lists `count` epochs (the process must still be running)."""
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        try:
            if len(json.loads((model_dir / "history.json").read_text())) >= count:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"training ended or stalled before {count} epochs: {process.poll()}")


def resume_and_check(converted, model_dir: Path) -> int:
    """Reruns the same command; checks it resumed and ended with one history entry per epoch."""
    resumed = run_cli("trainer.train", f"--data_dir={converted}", f"--model_dir={model_dir}", *LONG_TRAINING)
    resumed_at = first_epoch(resumed.stdout)
    assert resumed_at > 1, resumed.stdout[:2000]
    assert "restored" in resumed.stderr
    history = json.loads((model_dir / "metrics.json").read_text())["history"]
    assert [entry["epoch"] for entry in history] == list(range(1, LONG_EPOCHS + 1))
    return resumed_at


def first_epoch(stdout: str) -> int:
    return int(re.search(rf"Epoch (\d+)/{LONG_EPOCHS}", stdout).group(1))


def test_sigterm_checkpoints_and_exits_for_a_retry_and_a_killed_run_resumes_where_it_stopped(converted, tmp_path):
    model_dir = tmp_path / "model"
    # A preemption notice: the run checkpoints mid-epoch and exits 75, for the scheduler to retry it.
    process = start_training(converted, model_dir)
    try:
        wait_for_epochs(process, model_dir, 2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 75, stderr[-2000:]
    assert "preempted:" in stderr and "rerun the same command to resume" in stderr
    preempted_at = len(json.loads((model_dir / "history.json").read_text()))
    # The retry resumes after the epochs already done; then it is killed outright (no warning, no checkpoint).
    process = start_training(converted, model_dir)
    try:
        wait_for_epochs(process, model_dir, preempted_at + 2)
    finally:
        process.kill()
        stdout, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert first_epoch(stdout) > preempted_at >= 2 and "restored" in stderr, stdout[:2000]
    # Ctrl-C: one line and exit 130, no traceback; what was checkpointed stays.
    killed_at = len(json.loads((model_dir / "history.json").read_text()))
    process = start_training(converted, model_dir)
    try:
        wait_for_epochs(process, model_dir, killed_at + 1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("interrupted: rerun the same")
    # The same command once more resumes from the last checkpoint and ends with every epoch once.
    assert resume_and_check(converted, model_dir) > preempted_at + 1


BAD_TRAINING_INPUT = [
    # First: it splits the CPU into 2 devices, which only the first run of a process can (tests/entry_point_runs.py).
    (
        ["--data_dir={data}", "--model_dir={model}", "--strategy=mirrored", "--num_cpu_devices=2", "--batch_size=7"],
        r"--batch_size 7 must be a positive multiple of the 2 replicas",
    ),
    (["--data_dir={empty}", "--model_dir={model}"], r"--data_dir '.*' has no manifest.json"),
    (["--data_dir={data}", "--model_dir={model}", "--backbone=resnet5"], r"--backbone 'resnet5' is not a known"),
    (["--data_dir={data}", "--model_dir={model}", "--weights=/no/such/file.h5"], r"--weights '/no/such/file.h5'"),
    (
        ["--data_dir={data}", "--model_dir={model}", "--backbone=mobilenet_v2+resnet50", "--backbone_layer=block_5_add"],
        r"--backbone_layer 'block_5_add' cannot apply to ensemble",
    ),
    (["--data_dir={data}", "--model_dir={model}", "--label_smoothing=1.5"], r"--label_smoothing 1.5 must be within"),
    (["--data_dir={data}", "--model_dir={model}", "--data_threads=-1"], r"--data_threads -1 must be 0"),
    (
        ["--data_dir={data}", "--model_dir={model}", "--feature_cache_memory_mb=0"],
        r"--feature_cache_memory_mb=0.0 must be positive",
    ),
    # Values absl cannot read at all: the same one line and exit 2 (tfrecords/cli.py), not absl's FATAL.
    (["--data_dir={data}", "--model_dir={model}", "--batch_size=abc"], r"flag --batch_size=abc: invalid literal"),
    (
        ["--data_dir={data}", "--model_dir={model}", "--export_tflite=float,int4"],
        r"\['int4'\] not one of \['float', 'dynamic_range', 'int8'\]",
    ),
]


@pytest.fixture(scope="module")
def bad_training_runs(converted, tmp_path_factory) -> list:
    """Each BAD_TRAINING_INPUT case run by trainer.train (one process for all: tests/entry_point_runs.py)."""
    folders = [tmp_path_factory.mktemp("bad_training_input") for _ in BAD_TRAINING_INPUT]
    argument_lists = [
        [argument.format(empty=folder, data=converted, model=folder / "model") for argument in arguments]
        for folder, (arguments, _) in zip(folders, BAD_TRAINING_INPUT)
    ]
    return list(zip(folders, entry_point_runs.run_each("trainer.train", argument_lists)))


@pytest.mark.parametrize("case", range(len(BAD_TRAINING_INPUT)), ids=[message for _, message in BAD_TRAINING_INPUT])
def test_bad_training_input_is_a_one_line_error(bad_training_runs, case):
    folder, result = bad_training_runs[case]
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and re.search(BAD_TRAINING_INPUT[case][1], last_line), result.stderr[-2000:]
    assert not (folder / "model").exists()


@pytest.mark.skipif(
    not (FLOWERS_DIR.exists() and LITE0_BACKBONE.exists()), reason="../shared data and models are not beside this checkout"
)
def test_real_photos_with_a_pretrained_backbone_transfer(tmp_path):
    data_dir, model_dir = tmp_path / "flowers_tfrecords", tmp_path / "flowers_model"
    run_cli("tfrecords.build", f"--input_dir={FLOWERS_DIR}", f"--output_dir={data_dir}", "--num_shards=2")
    run_cli(
        "trainer.train", f"--data_dir={data_dir}", f"--model_dir={model_dir}", f"--backbone={LITE0_BACKBONE}",
        "--preprocess=tf", "--image_size=96", "--batch_size=32", "--epochs=10", "--steps_per_epoch=8",
        "--fine_tune_epochs=1", "--augment_rotation=0", "--augment_zoom=0",
        # One element order: the phase-2 check below compares two accuracies on 91 images, and a run whose order
        # depends on thread timing moved phase 2 by up to 0.11 on a loaded machine (0.00 to 0.02 with this order, 3 seeds).
        "--seed=1", "--deterministic",
        # Phase 1's pass (and the data-quality report's test pass) through the converted LiteRT model: auto would
        # keep these 850 views at 96 px in Keras (too few to repay the conversion).
        "--frozen_pass_engine=litert",
    )
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["frozen_pass"]["engine"] == "litert", metrics["frozen_pass"]
    assert metrics["frozen_pass"]["largest_difference"] <= 1e-4
    assert metrics["time_seconds"]["phase1: LiteRT conversion of the frozen pass"] > 0
    # 5 classes: chance is 0.2. Random-initialised features stay near it; ImageNet features do not.
    assert metrics["accuracy"] >= 0.45, metrics
    # The classic fine-tuning failure (BatchNorm statistics overwritten by small batches of new data)
    # takes accuracy back towards chance in phase 2; with BatchNorm kept in inference mode it holds.
    phase1, phase2 = metrics["phases"]["phase1"], metrics["phases"]["phase2"]
    assert phase2["validation_accuracy"] >= phase1["validation_accuracy"] - 0.1, metrics["phases"]
    # And the mechanism itself: fine-tuning changed the top of the backbone, but not one BatchNorm statistic.
    # Read from phase 2's own checkpoint: the final model may hold phase 1's weights, restored as the best.
    pretrained = keras.saving.load_model(LITE0_BACKBONE, compile=False)
    after_phase2 = classifier.build_model(
        classifier.ModelSpec(
            backbone=str(LITE0_BACKBONE), image_size=96, weights="imagenet", preprocess="tf", dropout=0.2,
        ),
        num_classes=5,
    )
    checkpoint = tf.train.latest_checkpoint(str(model_dir / "checkpoints" / "phase2"))
    tf.train.Checkpoint(model=after_phase2).restore(checkpoint).expect_partial().assert_existing_objects_matched()
    fine_tuned = classifier.get_backbones(after_phase2)[0]
    changed = {"batch_norm_statistics": 0, "other_weights": 0}
    for before, after in zip(pretrained.layers, fine_tuned.layers):
        for name, weight_before, weight_after in zip(
            [weight.path for weight in before.weights], before.get_weights(), after.get_weights()
        ):
            kind = "batch_norm_statistics" if "moving_" in name else "other_weights"
            changed[kind] += int(not np.array_equal(weight_before, weight_after))
    assert changed["batch_norm_statistics"] == 0 and changed["other_weights"] > 0, changed
    daisy = sorted((FLOWERS_DIR / "daisy").glob("*.jpg"))[0]
    assert serve_file(model_dir, daisy) in ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def test_a_100_to_1_imbalanced_folder_trains_with_balanced_class_weights(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    counts = {"train": {"common": 100, "rare": 1}, "validation": {"common": 4, "rare": 1}}
    for split, classes in counts.items():
        for class_name, count in classes.items():
            folder = tmp_path / "images" / split / class_name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    data_dir, model_dir = tmp_path / "tfrecords", tmp_path / "model"
    run_cli("tfrecords.build", f"--input_dir={tmp_path / 'images'}", f"--output_dir={data_dir}", "--num_shards=1")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    assert manifest["splits"]["train"]["class_counts"] == {"common": 100, "rare": 1}
    run_cli("trainer.train", f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--class_weight=balanced", "--nodata_quality",
            *TINY_TRAINING)
    report = json.loads((model_dir / "evaluation.json").read_text())
    assert [row["support"] for row in report["per_class"]] == [4, 1]


@pytest.mark.xdist_group("e2e_trained")
def test_training_with_every_export_evaluates_each_one_in_the_report(trained, demo_image_dir, tmp_path):
    model_dir, _, _, metrics = trained
    assert "--export_tflite=float,int8\n" in (model_dir / "flags.txt").read_text()  # the list, as given
    rows = json.loads((model_dir / "evaluation.json").read_text())["exports"]
    assert [row["format"] for row in rows] == ["saved_model", "tflite_float", "tflite_int8", *["onnx"] * ONNX_INSTALLED]
    assert rows[0]["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-4)
    assert rows[0]["num_examples"] == metrics["num_examples"]
    assert all(row["agreement_with_saved_model"] == 1.0 for row in rows if row["format"] in ("tflite_float", "onnx"))
    assert "exports on the test split" in (model_dir / "evaluation.txt").read_text()
    assert "## Exports" in (model_dir / "MODEL_CARD.md").read_text()
    # trainer.predict with each export: the same classes and probabilities (float TFLite and ONNX compute what the
    # SavedModel does), the same handling of a file that is not an image.
    images = tmp_path / "images"
    images.mkdir()
    for image in sorted(demo_image_dir.glob("*/*"))[::20]:
        (images / image.name).write_bytes(image.read_bytes())
    (images / "broken.jpg").write_bytes(b"not an image")
    outputs = {}
    for model_format in ("saved_model", "tflite", *["onnx"] * ONNX_INSTALLED):
        output = tmp_path / f"{model_format}.json"
        result = run_cli("trainer.predict", f"--model_dir={model_dir}", f"--format={model_format}", "--top_k=2",
                         f"--output={output}", str(images), check=False)
        assert result.returncode == 1, result.stderr[-2000:]  # the broken file, reported; the others labelled
        assert result.stderr.strip().splitlines()[-1] == f"error: {images / 'broken.jpg'}: not a decodable image"
        outputs[model_format] = json.loads(output.read_text())
    reference = outputs["saved_model"]
    assert len(reference) == len(list(images.iterdir())) - 1
    for model_format, labelled in outputs.items():
        assert [item["path"] for item in labelled] == [item["path"] for item in reference], model_format
        assert [item["class_name"] for item in labelled] == [item["class_name"] for item in reference], model_format
        np.testing.assert_allclose([item["probability"] for item in labelled],
                                   [item["probability"] for item in reference], atol=1e-4)


@pytest.mark.xdist_group("e2e_trained")
def test_a_finished_run_run_again_retrains_nothing(trained):
    # Last of the tests of the shared run: it runs the same command again in its model_dir.
    model_dir, command, _, metrics = trained
    second = run_cli("trainer.train", *command)
    assert "phase2 already finished" in second.stderr
    assert "Epoch" not in second.stdout
    rerun_metrics = json.loads((model_dir / "metrics.json").read_text())
    assert rerun_metrics["accuracy"] == pytest.approx(metrics["accuracy"])
    # Phase 1 is skipped on the rerun; its results are kept from the first run.
    assert set(rerun_metrics["phases"]) == {"phase1", "phase2"}
    for phase, results in metrics["phases"].items():
        assert rerun_metrics["phases"][phase] == pytest.approx(results)
