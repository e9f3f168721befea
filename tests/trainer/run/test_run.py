"""trainer/run/run.py: one run top to bottom in this process, its options, and a rerun that resumes."""

import dataclasses
import json

import pytest
import tensorflow as tf

from tests.trainer.models.test_classifier import save_tiny_backbone
from tests.trainer.reports.test_training_log import read_hparams
from tfrecords import schema
from trainer.exports import export
from trainer.fit import loop
from trainer.fit import transfer
from trainer.input import data
from trainer.models import classifier
from trainer.reports import evaluation
from trainer.reports import model_card
from trainer.run import run


def tiny_options(demo_data_dir, model_dir) -> run.RunOptions:
    backbone = save_tiny_backbone(model_dir.parent / "tiny_backbone.keras")
    return run.RunOptions(
        data_dir=str(demo_data_dir), model_dir=str(model_dir),
        model=classifier.ModelSpec(backbone=backbone, preprocess="tf", image_size=32),
        pipeline=data.PipelineOptions(seed=1),
        schedule=transfer.PhaseSchedule(epochs=2, fine_tune_epochs=1),
        loop=loop.LoopOptions(steps_per_epoch=2),
        batch_size=8,
    )


def test_a_run_trains_each_phase_evaluates_and_exports(demo_data_dir, tmp_path, monkeypatch):
    options = tiny_options(demo_data_dir, tmp_path / "model")
    manifest = schema.read_manifest(str(demo_data_dir))
    make_dataset, autotuned = data.make_dataset, []
    monkeypatch.setattr(data, "make_dataset",
                        lambda **kwargs: autotuned.append(kwargs["options"].autotune) or make_dataset(**kwargs))
    metrics = run.train_and_evaluate(options, strategy=tf.distribute.get_strategy(), manifest=manifest)
    monkeypatch.undo()
    # On a host without an accelerator every image pipeline of the run runs without tf.data's autotuning.
    assert autotuned and not any(autotuned)
    assert metrics["evaluated_split"] == "test" and metrics["num_examples"] == manifest["splits"]["test"]["num_examples"]
    assert list(metrics["phases"]) == ["phase1", "phase2"]
    assert [(entry["epoch"], entry["phase"]) for entry in metrics["history"]] == [(1, "phase1"), (2, "phase1"), (3, "phase2")]
    assert json.loads((tmp_path / "model" / run.METRICS_FILE).read_text()) == metrics
    assert schema.read_labels(str(tmp_path / "model")) == manifest["classes"]
    assert (tmp_path / "model" / export.KERAS_MODEL_FILE).exists()
    assert (tmp_path / "model" / export.SAVED_MODEL_DIR / "saved_model.pb").exists()
    # TensorBoard's HParams dashboard: this run's settings and final metrics.
    (hyperparameters, final), = read_hparams(tmp_path).values()
    assert hyperparameters["schedule.epochs"] == 2 and hyperparameters["batch_size"] == 8
    assert hyperparameters["model.image_size"] == 32 and hyperparameters["recipe.label_smoothing"] == pytest.approx(0.1)
    assert final["final/test_accuracy"] == pytest.approx(metrics["accuracy"])
    assert final["final/best_validation_accuracy"] == pytest.approx(max(e["val_accuracy"] for e in metrics["history"]))
    # The model card: the split and its size, the accuracy, and the exported signatures as saved.
    card = (tmp_path / "model" / model_card.MODEL_CARD_FILE).read_text()
    assert f"Split: **test**, {metrics['num_examples']} images. Accuracy **{metrics['accuracy']:.4f}**" in card
    assert "| `serving_default` | `image_bytes`: string [None] |" in card
    assert "| `serving_images` | `images`: uint8 [None, None, None, 3] |" in card
    assert f"`probabilities`: float32 [None, {len(manifest['classes'])}]" in card
    # TensorBoard's sample of augmented training images: taken from phase 1's pass (it decodes augmented views).
    assert augmented_image_summaries(tmp_path / "model") == [8]
    # The evaluation report comes from the run's own evaluation pass: metrics.json's numbers, and those of a pass
    # of its own over the model as saved.
    report = json.loads((tmp_path / "model" / evaluation.EVALUATION_JSON).read_text())
    assert report["num_examples"] == metrics["num_examples"] and report["accuracy"] == pytest.approx(metrics["accuracy"])
    alone = evaluation.evaluate_model(
        model=evaluation.load_model(str(tmp_path / "model")), data_dir=str(demo_data_dir), manifest=manifest,
        split="test", image_size=32, batch_size=8, class_names=manifest["classes"], top_k=options.export.top_k,
        output_dir=str(tmp_path / "alone"),
    )
    assert alone["confusion_matrix"] == report["confusion_matrix"]
    assert alone["top_k_accuracy"] == pytest.approx(report["top_k_accuracy"])
    # A rerun of the finished run trains nothing and reports the same numbers, phase results included.
    again = run.train_and_evaluate(options, strategy=tf.distribute.get_strategy(), manifest=manifest)
    assert again["history"] == metrics["history"] and again["phases"] == metrics["phases"]
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])


def augmented_image_summaries(model_dir) -> list:
    """The number of images in each augmented_training_images summary of the run's TensorBoard train log."""
    counts = []
    for path in (model_dir / "logs" / "train").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            counts += [len(value.tensor.string_val) - 2 for value in event.summary.value
                       if value.tag == "augmented_training_images"]
    return counts


def test_without_phase1s_pass_the_augmented_sample_is_read_on_its_own(demo_data_dir, tmp_path):
    options = tiny_options(demo_data_dir, tmp_path / "model")
    options = dataclasses.replace(options, schedule=dataclasses.replace(options.schedule, cache_features=False,
                                                                         fine_tune_epochs=0))
    run.train_and_evaluate(options, strategy=tf.distribute.get_strategy(), manifest=schema.read_manifest(str(demo_data_dir)))
    assert augmented_image_summaries(tmp_path / "model") == [8]


def test_a_resumed_run_does_not_write_the_augmented_sample_again(demo_data_dir, tmp_path):
    options = tiny_options(demo_data_dir, tmp_path / "model")
    manifest = schema.read_manifest(str(demo_data_dir))
    # Phase 1 only, then the same model_dir with a phase 2 more (as a run stopped after phase 1 resumes).
    first = dataclasses.replace(options, schedule=dataclasses.replace(options.schedule, fine_tune_epochs=0))
    run.train_and_evaluate(first, strategy=tf.distribute.get_strategy(), manifest=manifest)
    metrics = run.train_and_evaluate(options, strategy=tf.distribute.get_strategy(), manifest=manifest)
    assert [entry["phase"] for entry in metrics["history"]] == ["phase1", "phase1", "phase2"]
    assert augmented_image_summaries(tmp_path / "model") == [8]


def test_options_check_their_flags_and_the_identity_names_the_model(demo_data_dir, tmp_path):
    options = tiny_options(demo_data_dir, tmp_path / "model")
    with pytest.raises(ValueError, match="--precision 'float16' is not one of"):
        dataclasses.replace(options, precision="float16")
    with pytest.raises(ValueError, match="--data_dir and --model_dir are required"):
        dataclasses.replace(options, model_dir="")
    manifest = schema.read_manifest(str(demo_data_dir))
    identity = options.identity(manifest)
    assert identity["classes"] == manifest["classes"] and identity["image_size"] == 32
    assert identity["preprocess"] == "tf" and identity["augmentation_in_model"] == {}
    on_device = dataclasses.replace(options, augmentation=data.LayerAugmentation(rotation=0.1, on="device"))
    assert on_device.identity(manifest)["augmentation_in_model"] == {"rotation": 0.1}
    assert on_device.augmented and not dataclasses.replace(
        options, pipeline=data.PipelineOptions(flip=False, crop_min_area=1.0)).augmented
