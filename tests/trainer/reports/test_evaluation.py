"""trainer/reports/evaluation.py: evaluate_model on the demo TFRecords, the learning curves, and the CLI as a subprocess."""

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from tests import entry_point_runs
from tests.conftest import REPO_ROOT
from tfrecords import schema
from trainer.exports import export
from trainer.input import data
from trainer.models import classifier
from trainer.reports import evaluation
from trainer.reports import training_log

IMAGE_SIZE = 32
ENVIRONMENT = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO_ROOT)}
REPORT_FILES = [evaluation.EVALUATION_JSON, evaluation.EVALUATION_TEXT, evaluation.CONFUSION_MATRIX_PNG, evaluation.ERRORS_PNG]


@pytest.fixture(scope="module")
def tiny_model():
    return classifier.build_model(
        classifier.ModelSpec(
            backbone="mobilenet_v2", image_size=IMAGE_SIZE, weights="none", preprocess="tf", dropout=0.0,
        ),
        num_classes=3,
    )


@pytest.fixture(scope="module")
def manifest(demo_data_dir):
    return schema.read_manifest(str(demo_data_dir))


def check_png(path):
    image = Image.open(io.BytesIO(path.read_bytes()))
    image.load()
    assert image.format == "PNG" and 100 < image.width < 3000 and 50 < image.height < 3000


def test_evaluate_model_covers_every_test_example_once(tiny_model, demo_data_dir, manifest, tmp_path):
    split = manifest["splits"]["test"]
    # A batch size that does not divide the split: the padding of the last batch must be dropped.
    batch_size = 5 if split["num_examples"] % 5 else 7
    result = evaluation.evaluate_model(
        model=tiny_model, data_dir=str(demo_data_dir), manifest=manifest, split="test", image_size=IMAGE_SIZE,
        batch_size=batch_size, class_names=manifest["classes"], top_k=2, output_dir=str(tmp_path / "report"),
        max_error_images=4,
    )
    assert result["split"] == "test" and result["data_dir"] == str(demo_data_dir)
    assert result["num_examples"] == split["num_examples"]
    assert sum(row["support"] for row in result["per_class"]) == split["num_examples"]
    # Rows of the confusion matrix are the true classes: their sums are the split's class counts.
    class_counts = [split["class_counts"][name] for name in manifest["classes"]]
    assert [sum(row) for row in result["confusion_matrix"]] == class_counts
    assert result["top_k"] == 2 and result["top_k_accuracy"] >= result["accuracy"]
    for name in REPORT_FILES:
        assert (tmp_path / "report" / name).exists()
    assert json.loads((tmp_path / "report" / evaluation.EVALUATION_JSON).read_text()) == result
    text = (tmp_path / "report" / evaluation.EVALUATION_TEXT).read_text()
    assert all(name in text for name in manifest["classes"])
    check_png(tmp_path / "report" / evaluation.CONFUSION_MATRIX_PNG)
    check_png(tmp_path / "report" / evaluation.ERRORS_PNG)


def test_evaluate_model_rejects_a_missing_split(tiny_model, demo_data_dir, manifest, tmp_path):
    manifest = {**manifest, "splits": {"train": manifest["splits"]["train"]}}
    with pytest.raises(ValueError, match="has no 'test' split"):
        evaluation.evaluate_model(
            model=tiny_model, data_dir=str(demo_data_dir), manifest=manifest, split="test", image_size=IMAGE_SIZE,
            batch_size=8, class_names=["circle", "square", "triangle"], top_k=5, output_dir=str(tmp_path),
        )


def test_evaluate_model_rejects_a_bad_top_k(tiny_model, demo_data_dir, manifest, tmp_path):
    with pytest.raises(ValueError, match="--top_k 0 must be at least 1"):
        evaluation.evaluate_model(
            model=tiny_model, data_dir=str(demo_data_dir), manifest=manifest, split="test", image_size=IMAGE_SIZE,
            batch_size=8, class_names=manifest["classes"], top_k=0, output_dir=str(tmp_path),
        )


def test_write_learning_curves(tmp_path):
    assert evaluation.write_learning_curves(str(tmp_path)) is None
    history = [
        {"epoch": epoch, "phase": phase, "loss": 1.0 / epoch, "accuracy": 0.5, "val_loss": 1.1 / epoch,
         "val_accuracy": 0.4, "learning_rate": 1e-3, "images_per_second": 10.0, "input_wait_fraction": 0.1}
        for epoch, phase in [(1, "phase1"), (2, "phase1"), (3, "phase2")]
    ]
    (tmp_path / training_log.HISTORY_FILE).write_text(json.dumps(history))
    path = evaluation.write_learning_curves(str(tmp_path))
    assert path == str(tmp_path / evaluation.LEARNING_CURVES_PNG)
    check_png(tmp_path / evaluation.LEARNING_CURVES_PNG)


def test_load_model_without_a_model_says_train_first(tmp_path):
    with pytest.raises(ValueError, match=f"has no {export.KERAS_MODEL_FILE}; train first"):
        evaluation.load_model(str(tmp_path))


def test_class_names_must_match_the_model(tmp_path):
    (tmp_path / "labels.txt").write_text("circle\nsquare\ntriangle\n")
    evaluation.check_class_names(model_dir=str(tmp_path), data_dir="d", class_names=["circle", "square", "triangle"],
                               num_outputs=3)
    with pytest.raises(ValueError, match="has 2 classes but the model predicts 3"):
        evaluation.check_class_names(model_dir=str(tmp_path), data_dir="d", class_names=["a", "b"], num_outputs=3)
    with pytest.raises(ValueError, match="differ from the model's"):
        evaluation.check_class_names(model_dir=str(tmp_path), data_dir="d", class_names=["a", "b", "c"], num_outputs=3)


def run_evaluate(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", *arguments], cwd=REPO_ROOT, env=ENVIRONMENT,
        capture_output=True, text=True, timeout=300,
    )


def test_cli_writes_report_and_plots(tiny_model, demo_data_dir, manifest, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tiny_model.save(str(model_dir / export.KERAS_MODEL_FILE))
    history = [{"epoch": 1, "phase": "phase1", "loss": 1.0, "accuracy": 0.4, "val_loss": 1.1, "val_accuracy": 0.3}]
    (model_dir / training_log.HISTORY_FILE).write_text(json.dumps(history))
    result = run_evaluate(f"--model_dir={model_dir}", f"--data_dir={demo_data_dir}", "--batch_size=8", "--top_k=2")
    assert result.returncode == 0, result.stderr[-4000:]
    output_dir = model_dir / "evaluation_test"
    for name in REPORT_FILES:
        assert (output_dir / name).exists()
        assert f"wrote {output_dir / name}" in result.stdout
    # Into --output_dir with the rest: the run's own folder is left as the run wrote it.
    assert (output_dir / evaluation.LEARNING_CURVES_PNG).exists()
    assert f"wrote {output_dir / evaluation.LEARNING_CURVES_PNG}" in result.stdout
    assert sorted(path.name for path in model_dir.iterdir()) == sorted(
        [export.KERAS_MODEL_FILE, training_log.HISTORY_FILE, "evaluation_test"])
    assert "top-2 accuracy" in result.stdout and all(name in result.stdout for name in manifest["classes"])
    report = json.loads((output_dir / evaluation.EVALUATION_JSON).read_text())
    assert report["num_examples"] == manifest["splits"]["test"]["num_examples"]


@pytest.fixture(scope="module")
def evaluate_runs(tiny_model, demo_data_dir, demo_image_dir, tmp_path_factory) -> dict:
    """trainer.evaluate without a model, and on data without a test split: one process (tests/entry_point_runs.py)."""
    from tfrecords.run import conversion

    folder = tmp_path_factory.mktemp("evaluate_runs")
    data_dir = folder / "no_test_split"
    conversion.build(conversion.Source(input_dir=str(demo_image_dir)), str(data_dir), conversion.ConversionOptions(
        validation_fraction=0.25, test_fraction=0.0, num_shards=1, seed=1, num_workers=1))
    model_dir = folder / "model"
    model_dir.mkdir()
    tiny_model.save(str(model_dir / export.KERAS_MODEL_FILE))
    without_a_model, without_a_test_split = entry_point_runs.run_each("trainer.evaluate", [
        [f"--model_dir={folder / 'missing'}", f"--data_dir={demo_data_dir}"],
        [f"--model_dir={model_dir}", f"--data_dir={data_dir}", "--batch_size=8"],
    ])
    return {"folder": folder, "data_dir": data_dir, "model_dir": model_dir,
            "without_a_model": without_a_model, "without_a_test_split": without_a_test_split}


def test_cli_without_a_model_is_a_one_line_error(evaluate_runs):
    result, missing = evaluate_runs["without_a_model"], evaluate_runs["folder"] / "missing"
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    assert error_lines[0] == (
        f"error: --model_dir {str(missing)!r} has no {export.KERAS_MODEL_FILE}; train first: "
        "python -m trainer.train --data_dir=<data_dir> --model_dir=<model_dir>"
    )


def test_cli_without_split_evaluates_what_training_reports_validation_when_there_is_no_test(evaluate_runs):
    result, data_dir, model_dir = (evaluate_runs[key] for key in ("without_a_test_split", "data_dir", "model_dir"))
    manifest = schema.read_manifest(str(data_dir))
    assert "test" not in manifest["splits"] and data.evaluation_split(manifest) == "validation"
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith(f"validation split of {data_dir}: {manifest['splits']['validation']['num_examples']} images")
    report = json.loads((model_dir / "evaluation_validation" / evaluation.EVALUATION_JSON).read_text())
    assert report["split"] == "validation"
    assert report["num_examples"] == manifest["splits"]["validation"]["num_examples"]
