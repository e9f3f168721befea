"""trainer/fit/lite_pass.py: the frozen pass in LiteRT gives Keras's features and activations, or says why not."""

import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.trainer.fit.test_activations import IMAGE_SIZE, build, residual_backbone_file
from tfrecords import schema
from trainer.fit import activations
from trainer.fit import features
from trainer.fit import lite_pass
from trainer.fit import steps
from trainer.fit import transfer
from trainer.input import data

LITERT = lite_pass.Decision("litert", "--frozen_pass_engine=litert")
KERAS = lite_pass.Decision("keras", "--frozen_pass_engine=keras")


def test_plan_decides_and_says_why(tmp_path, monkeypatch):
    model = build(residual_backbone_file(tmp_path))
    strategy = tf.distribute.get_strategy()
    plan = lambda mode, views=100_000, image_size=224: lite_pass.plan(  # noqa: E731
        mode, model=model, strategy=strategy, views=views, image_size=image_size)
    assert plan("keras") == KERAS
    assert plan("litert") == LITERT
    assert plan("auto").engine == "litert" and "on a CPU host" in plan("auto").reason
    small = plan("auto", views=lite_pass.MIN_VIEWS - 1)
    assert small.engine == "keras" and "repays itself" in small.reason
    # Smaller images: each view saves less, so more of them are needed to repay the conversion.
    assert plan("auto", views=lite_pass.MIN_VIEWS, image_size=224).engine == "litert"
    assert plan("auto", views=lite_pass.MIN_VIEWS, image_size=112).engine == "keras"
    assert plan("auto", views=4 * lite_pass.MIN_VIEWS, image_size=112).engine == "litert"
    with pytest.raises(ValueError, match="--frozen_pass_engine 'onnx' is not one of"):
        plan("onnx")
    monkeypatch.setattr(data, "has_accelerator", lambda strategy: True)
    assert plan("auto") == lite_pass.Decision("keras", "an accelerator runs the pass")
    forced = plan("litert")
    assert forced.engine == "keras" and forced.reason.startswith("--frozen_pass_engine=litert cannot run")


def test_plan_refuses_what_litert_cannot_run(tmp_path):
    strategy = tf.distribute.get_strategy()
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        decision = lite_pass.plan("auto", model=build(residual_backbone_file(tmp_path)), strategy=strategy,
                                  views=100_000, image_size=224)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert decision.engine == "keras" and "mixed_bfloat16" in decision.reason
    baseline = transfer.classifier.build_baseline_cnn(num_classes=3, image_size=IMAGE_SIZE, dropout=0.0)
    decision = lite_pass.plan("auto", model=baseline, strategy=strategy, views=100_000, image_size=224)
    assert decision.engine == "keras" and "single-backbone" in decision.reason


def phase1_pass(tmp_path, demo_data_dir, backbone_file, decision, *, cut_at: str | None = "6",
                budget=features.CacheBudget()):
    """Phase 1's pass (no augmentation, validation too) with an activation cache: (PhaseData, cache or None)."""
    manifest = schema.read_manifest(str(demo_data_dir))
    strategy = tf.distribute.get_strategy()
    model = build(backbone_file)
    # A batch that does not divide the split: the last validation batch is padded, the LitePass pads it again.
    splits = data.DistributedSplits(
        strategy=strategy, data_dir=str(demo_data_dir), manifest=manifest, image_size=IMAGE_SIZE, batch_size=8,
        options=data.PipelineOptions(crop_min_area=1.0, flip=False, seed=3, deterministic=True),
    )
    cache = None
    if cut_at is not None:
        cut = activations.plan(model, mode="always", fine_tune_at=cut_at, image_size=IMAGE_SIZE, rows=10,
                               budget=features.CacheBudget()).cut
        cache = activations.ActivationCache(cut)
    phase = transfer.Phase("phase1", 0, 1, 0.01, "adam", None)
    trained = transfer.phase_data(phase, model=model, splits=splits, schedule=transfer.PhaseSchedule(feature_cache=budget),
                                  augmented=False, seed=3, activations=cache, frozen_pass=decision,
                                  evaluation_step=steps.make_evaluation_step(model=model, strategy=strategy))
    return trained, cache


def rows(dataset) -> np.ndarray:
    return np.concatenate([keras.ops.convert_to_numpy(batch[0]) for batch in dataset])


@pytest.mark.parametrize("cut_at", ["6", None], ids=["features_and_activations", "features_only"])
def test_litert_pass_caches_what_the_keras_pass_caches(tmp_path, demo_data_dir, cut_at, monkeypatch, caplog):
    backbone_file = residual_backbone_file(tmp_path)
    keras_data, keras_cache = phase1_pass(tmp_path, demo_data_dir, backbone_file, KERAS, cut_at=cut_at)

    def no_disk(*args, **kwargs):
        raise AssertionError("the conversion wrote a temporary folder (a SavedModel)")

    monkeypatch.setattr(tempfile, "mkdtemp", no_disk)  # converted from the traced function, in memory
    lite_data, lite_cache = phase1_pass(tmp_path, demo_data_dir, backbone_file, LITERT, cut_at=cut_at)
    monkeypatch.undo()
    # TensorFlow's notice that a conversion without a trackable object is deprecated stays out of the run's log.
    assert not [record for record in caplog.records if "trackable_obj" in record.getMessage()]
    assert isinstance(lite_data.pass_model, lite_pass.LitePass)
    assert not isinstance(keras_data.pass_model, lite_pass.LitePass)
    described = lite_pass.describe(lite_data.pass_model, LITERT)
    assert described["engine"] == "litert" and described["largest_difference"] <= lite_pass.TOLERANCE
    assert lite_pass.conversion_seconds(lite_data.pass_model) > 0
    assert lite_pass.conversion_seconds(lite_data.pass_model) == 0  # counted once
    expected, got = rows(keras_data.validation_dataset), rows(lite_data.validation_dataset)
    assert got.shape == expected.shape and np.abs(expected).max() > 0
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    if cut_at is not None:
        for split in ("train", "validation"):
            want, have = (getattr(cache, split).arrays[0].numpy() for cache in (keras_cache, lite_cache))
            assert have.shape == want.shape
            np.testing.assert_allclose(have, want, atol=1e-4 * np.abs(want).max())
        for cache in (keras_cache, lite_cache):
            cache.delete()


def test_a_conversion_that_disagrees_or_fails_falls_back_to_keras_and_says_why(tmp_path, demo_data_dir, monkeypatch,
                                                                               caplog):
    backbone_file = residual_backbone_file(tmp_path)
    monkeypatch.setattr(lite_pass, "TOLERANCE", -1.0)  # no conversion can agree this well
    trained, cache = phase1_pass(tmp_path, demo_data_dir, backbone_file, LITERT)
    assert not isinstance(trained.pass_model, lite_pass.LitePass) and cache.filled
    described = lite_pass.describe(trained.pass_model, LITERT)
    assert described["engine"] == "keras" and "LiteRT not used: its outputs differ from Keras's" in described["reason"]
    cache.delete()

    def broken(*args, **kwargs):
        raise RuntimeError("'tfl.custom' op is neither a custom op nor a flex op\nmore lines of MLIR")

    monkeypatch.setattr(lite_pass, "convert", broken)
    trained, cache = phase1_pass(tmp_path, demo_data_dir, backbone_file, LITERT)
    assert not isinstance(trained.pass_model, lite_pass.LitePass) and cache.filled
    reason = lite_pass.describe(trained.pass_model, LITERT)["reason"]
    assert reason.endswith("LiteRT not used: conversion failed: 'tfl.custom' op is neither a custom op nor a flex op")
    assert any("the pass runs in Keras" in record.getMessage() for record in caplog.records)
    cache.delete()


def test_a_check_with_nothing_to_compare_falls_back_to_keras(tmp_path, demo_data_dir):
    """A backbone whose outputs are zero whatever the image (here every weight zero; in practice dead ReLUs of a
    random one): LiteRT agreeing with it proves nothing, so the pass stays in Keras and says why."""
    backbone = keras.saving.load_model(residual_backbone_file(tmp_path), compile=False)
    backbone.set_weights([np.zeros_like(weight) for weight in backbone.get_weights()])
    backbone.save(tmp_path / "zero_backbone.keras")
    trained, cache = phase1_pass(tmp_path, demo_data_dir, str(tmp_path / "zero_backbone.keras"), LITERT)
    assert not isinstance(trained.pass_model, lite_pass.LitePass)
    assert lite_pass.describe(trained.pass_model, LITERT)["reason"].endswith(
        "LiteRT not used: could not be checked: Keras's outputs on random images are all zero")
    cache.delete()
