"""trainer/reports/export_accuracy.py: every export evaluated through its runtime, compared with the SavedModel, flagged."""

import json

import numpy as np
import pytest
import tensorflow as tf

from tfrecords import schema
from trainer.exports import export
from trainer.models import classifier
from trainer.reports import evaluation
from trainer.reports import export_accuracy
from trainer.reports import model_card


def test_rows_compare_each_export_with_the_saved_model_and_flag_by_the_tolerance(caplog):
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    reference = labels.copy()
    reference[0] = 1  # the SavedModel: 9 of 10
    one_off = reference.copy()
    one_off[1] = 0  # 8 of 10: 0.1 below
    files = [("saved_model", "saved_model", "TF", 100), ("tflite_float", "tflite/model.tflite", "LiteRT", 40),
             ("tflite_int8", "tflite/model_int8.tflite", "LiteRT", 10)]
    rows = export_accuracy.make_rows(labels=labels, files=files, tolerance=0.05, predictions={
        "saved_model": reference, "tflite_float": reference, "tflite_int8": one_off})
    assert [row["accuracy"] for row in rows] == [0.9, 0.9, 0.8]
    assert [row["agreement_with_saved_model"] for row in rows] == [1.0, 1.0, 0.9]
    assert [row["flagged"] for row in rows] == [False, False, True]
    export_accuracy.warn_flagged(rows, split="test", tolerance=0.05)
    assert [record for record in caplog.records if "EXPORT FLAGGED: tflite_int8" in record.getMessage()]
    # A drop of exactly the tolerance is within it.
    rows = export_accuracy.make_rows(labels=labels, files=files, tolerance=0.1, predictions={
        "saved_model": reference, "tflite_float": reference, "tflite_int8": one_off})
    assert not any(row["flagged"] for row in rows)


@pytest.fixture(scope="module")
def exported_run(demo_data_dir, tmp_path_factory):
    """A model_dir with a SavedModel and the TFLite (float, int8) exports of a small untrained classifier."""
    manifest = schema.read_manifest(str(demo_data_dir))
    model_dir = str(tmp_path_factory.mktemp("exported_run"))
    model = classifier.build_model(
        classifier.ModelSpec(backbone="mobilenet_v2", image_size=32, weights="none", preprocess="tf", dropout=0.0),
        num_classes=len(manifest["classes"]),
    )
    options = export.ExportOptions(tflite=("float", "int8"), calibration_images=8)
    calibration = export.read_calibration_images(data_dir=str(demo_data_dir), manifest=manifest, image_size=32, count=8)
    assert calibration.shape == (8, 32, 32, 3) and calibration.dtype == np.float32
    export.export_run(model=model, class_names=manifest["classes"], model_dir=model_dir, options=options,
                      strategy=tf.distribute.get_strategy(), calibration_images=calibration)
    return model, model_dir, manifest


def test_every_export_is_evaluated_and_lands_in_the_report_and_the_card(exported_run, demo_data_dir):
    model, model_dir, manifest = exported_run
    report = evaluation.evaluate_model(
        model=model, data_dir=str(demo_data_dir), manifest=manifest, split="test", image_size=32, batch_size=8,
        class_names=manifest["classes"], top_k=1, output_dir=model_dir,
    )
    rows = export_accuracy.evaluate_exports(model_dir=model_dir, data_dir=str(demo_data_dir), manifest=manifest,
                                          split="test", image_size=32, tolerance=0.02)
    assert [row["format"] for row in rows] == ["saved_model", "tflite_float", "tflite_int8"]
    num_test = manifest["splits"]["test"]["num_examples"]
    assert all(row["num_examples"] == num_test and row["size_bytes"] > 0 for row in rows)
    # The SavedModel through serving_default scores as the Keras model did in the evaluation report.
    assert rows[0]["accuracy"] == pytest.approx(report["accuracy"], abs=1e-4)
    assert rows[1]["agreement_with_saved_model"] == 1.0 and not rows[1]["flagged"]
    assert rows[2]["size_bytes"] < rows[1]["size_bytes"]
    assert rows[1]["runtime"] in ("LiteRT", "tf.lite.Interpreter")

    export_accuracy.add_to_report(output_dir=model_dir, rows=rows, report=report)
    saved = json.loads(tf.io.gfile.GFile(f"{model_dir}/{evaluation.EVALUATION_JSON}").read())
    assert saved["exports"] == rows and saved["accuracy"] == report["accuracy"]
    text = tf.io.gfile.GFile(f"{model_dir}/{evaluation.EVALUATION_TEXT}").read()
    assert "exports on the test split" in text and "tflite_int8" in text
    card_metrics = {"evaluated_split": "test", "num_examples": num_test, "accuracy": report["accuracy"], "loss": 1.0,
                    "backbone": "mobilenet_v2", "image_size": 32, "num_classes": 3, "num_replicas": 1,
                    "phases": {}, "restored_best_weights_of_epoch": None, "history": []}
    model_card.write_model_card(model_dir=model_dir, manifest=manifest, metrics=card_metrics, evaluation=report)
    card = tf.io.gfile.GFile(f"{model_dir}/{model_card.MODEL_CARD_FILE}").read()
    assert "## Exports" in card and "`tflite/model_int8.tflite`" in card
    assert "uint8 [1, 32, 32, 3] (scale" in card  # the int8 file's input quantization, as users need it
