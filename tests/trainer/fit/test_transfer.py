"""trainer/fit/transfer.py: the phase plan and what each phase trains on."""

import keras
import pytest

from trainer.fit import transfer
from trainer.models import classifier


def five_layer_model(tmp_path) -> keras.Model:
    """A classifier whose backbone has 5 layers, the third named block5a (fine_tune_at fraction 0.4)."""
    backbone = keras.Sequential([
        keras.Input((None, None, 3)),
        keras.layers.Conv2D(4, 3, name="block1"),
        keras.layers.Conv2D(4, 3, name="block2"),
        keras.layers.Conv2D(4, 3, name="block5a"),
        keras.layers.Conv2D(4, 3, name="block6"),
        keras.layers.Conv2D(4, 3, name="block7"),
    ], name="five_layers")
    path = str(tmp_path / "five_layers.keras")
    backbone.save(path)
    spec = classifier.ModelSpec(backbone=path, preprocess="tf", image_size=16)
    return classifier.build_model(spec, num_classes=2)


def test_plan_without_gradual_unfreezing_is_phase1_then_phase2(tmp_path):
    schedule = transfer.PhaseSchedule(epochs=3, fine_tune_epochs=4, learning_rate=1e-3, fine_tune_optimizer="sgd")
    phases = transfer.plan_phases(schedule, batch_size=32, model=five_layer_model(tmp_path))
    assert phases == [
        transfer.Phase("phase1", 0, 3, 1e-3, "adam", None),
        transfer.Phase("phase2", 3, 7, 1e-4, "sgd", "0.7"),
    ]


def test_gradual_unfreezing_goes_deeper_each_stage_and_ends_at_fine_tune_at(tmp_path):
    schedule = transfer.PhaseSchedule(epochs=2, fine_tune_epochs=6, fine_tune_at="block5a", unfreeze_stages=3)
    phases = transfer.plan_phases(schedule, batch_size=32, model=five_layer_model(tmp_path))
    assert [phase.name for phase in phases] == ["phase1", "phase2", "phase2-stage2", "phase2-stage3"]
    assert [(phase.first_epoch, phase.last_epoch) for phase in phases] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [phase.fine_tune_at for phase in phases[1:]] == ["0.8000", "0.6000", "block5a"]
    with pytest.raises(ValueError, match="--feature_views and --unfreeze_stages must be at least 1"):
        transfer.PhaseSchedule(unfreeze_stages=0)


def test_fine_tune_at_is_checked_against_the_backbone_before_phase_1(tmp_path):
    with pytest.raises(ValueError, match="--fine_tune_at 'mixed7' is not a layer of backbone"):
        transfer.plan_phases(transfer.PhaseSchedule(fine_tune_at="mixed7"), batch_size=32, model=five_layer_model(tmp_path))


def test_learning_rates_default_and_scale_linearly_with_the_batch():
    assert transfer.PhaseSchedule(learning_rate=1e-3).learning_rates(256) == pytest.approx((1e-3, 1e-4))
    scaled = transfer.PhaseSchedule(learning_rate=1e-3, fine_tune_learning_rate=2e-4, learning_rate_scaling="linear")
    assert scaled.learning_rates(64) == pytest.approx((2e-3, 4e-4))
    with pytest.raises(ValueError, match="--optimizer 'lamb' is not one of"):
        transfer.PhaseSchedule(optimizer="lamb")


def test_the_baseline_cnn_trains_whole_in_one_phase_of_the_same_budget():
    model = classifier.build_model(classifier.ModelSpec(image_size=32, weights="none", baseline_cnn=True), num_classes=3)
    phases = transfer.plan_phases(transfer.PhaseSchedule(epochs=3, fine_tune_epochs=2), batch_size=8, model=model)
    assert phases == [transfer.Phase("baseline_cnn", 0, 5, 1e-3, "adam", None)]


def test_negative_epochs_are_refused_naming_both_flags():
    with pytest.raises(ValueError, match="--epochs -1 and --fine_tune_epochs 3 must be >= 0"):
        transfer.PhaseSchedule(epochs=-1)
