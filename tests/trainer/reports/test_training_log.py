"""trainer/reports/training_log.py: history.json, the per-epoch console line and TensorBoard summaries."""

import time

import numpy as np
import pytest

from trainer.reports import training_log


def test_history_persists_and_forgets_epochs_past_a_checkpoint(tmp_path):
    history = training_log.History(str(tmp_path), chief=True)
    for epoch in (1, 2, 3):
        history.append({"epoch": epoch, "val_accuracy": epoch / 10})
    reloaded = training_log.History(str(tmp_path), chief=True)
    assert [entry["epoch"] for entry in reloaded.epochs] == [1, 2, 3]
    reloaded.keep_until(2)
    assert reloaded.best_validation_accuracy() == pytest.approx(0.2)
    assert training_log.History(str(tmp_path / "new"), chief=True).best_validation_accuracy() == -np.inf
    not_chief = training_log.History(str(tmp_path / "other"), chief=False)
    not_chief.append({"epoch": 1, "val_accuracy": 0.5})
    assert not (tmp_path / "other" / training_log.HISTORY_FILE).exists()


def test_epoch_line_says_when_the_input_wait_cannot_be_measured():
    entry = {"epoch": 3, "phase": "phase2", "images_per_second": 120.4, "input_wait_fraction": None, "loss": 0.5,
             "accuracy": 0.75, "val_loss": 0.6, "val_accuracy": 0.7}
    line = training_log.format_epoch(entry, epochs=5, steps=10, elapsed=2.0)
    assert line.startswith("Epoch 3/5 (phase2) - 10 steps - 2.0s - 120 img/s - input wait n/a")
    assert "val_accuracy: 0.7000" in line
    assert training_log.format_fraction(0.25) == "25%"


def read_hparams(parent_dir) -> dict:
    """What TensorBoard's HParams dashboard finds under parent_dir: {run: (hyperparameters, final metrics)}."""
    from tensorboard.backend.event_processing import event_multiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    multiplexer = event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(parent_dir))
    multiplexer.Reload()
    found = {}
    for run, tags in multiplexer.PluginRunToTagToContent("hparams").items():
        start = plugin_data_pb2.HParamsPluginData.FromString(tags["_hparams_/session_start_info"]).session_start_info
        hyperparameters = {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}
        scalars = multiplexer.PluginRunToTagToContent("scalars").get(run, {})
        final = {tag: float(tf_value(multiplexer.Tensors(run, tag)[-1].tensor_proto)) for tag in scalars
                 if tag.startswith("final/")}
        found[run] = (hyperparameters, final)
    return found


def tf_value(tensor_proto):
    import tensorflow as tf

    return tf.make_ndarray(tensor_proto)


def test_hparams_of_runs_in_one_folder_show_side_by_side(tmp_path):
    for name, rate in (("run_a", 1e-3), ("run_b", 3e-3)):
        training_log.write_hparams(model_dir=str(tmp_path / name), hyperparameters={
            "model.backbone": "efficientnet_lite0", "schedule.learning_rate": rate, "augment": True, "batch_size": 32},
            final_metrics={"test_accuracy": 0.5 + rate * 100, "best_validation_accuracy": 0.7})
    found = read_hparams(tmp_path)
    assert sorted(found) == ["run_a/logs", "run_b/logs"]
    hyperparameters, final = found["run_b/logs"]
    assert hyperparameters == {"model.backbone": "efficientnet_lite0", "schedule.learning_rate": 3e-3,
                               "augment": True, "batch_size": 32.0}
    assert final == pytest.approx({"final/test_accuracy": 0.8, "final/best_validation_accuracy": 0.7})


def test_the_stopwatch_adds_stages_of_one_name_and_accounts_for_the_rest():
    stopwatch = training_log.Stopwatch(started=time.perf_counter() - 10.0)  # the program started 10 s ago
    stopwatch.add("phase1: training and validation", 2.0)
    stopwatch.add("phase1: training and validation", 1.0)
    with stopwatch.stage("export"):
        pass
    times = stopwatch.summary()
    assert list(times) == ["phase1: training and validation", "export", "other", "total"]
    assert times["phase1: training and validation"] == 3.0 and 9.9 <= times["total"] <= 11.0
    assert times["other"] == pytest.approx(times["total"] - 3.0 - times["export"], abs=0.2)
    table = training_log.format_times(times)
    assert table.splitlines()[0].startswith("where the time went") and "phase1: training and validation" in table
