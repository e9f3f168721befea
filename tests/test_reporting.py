"""trainer/reporting.py: history.json, the per-epoch console line and TensorBoard summaries."""

import numpy as np
import pytest

from trainer import reporting


def test_history_persists_and_forgets_epochs_past_a_checkpoint(tmp_path):
    history = reporting.History(str(tmp_path), chief=True)
    for epoch in (1, 2, 3):
        history.append({"epoch": epoch, "val_accuracy": epoch / 10})
    reloaded = reporting.History(str(tmp_path), chief=True)
    assert [entry["epoch"] for entry in reloaded.epochs] == [1, 2, 3]
    reloaded.keep_until(2)
    assert reloaded.best_validation_accuracy() == pytest.approx(0.2)
    assert reporting.History(str(tmp_path / "new"), chief=True).best_validation_accuracy() == -np.inf
    not_chief = reporting.History(str(tmp_path / "other"), chief=False)
    not_chief.append({"epoch": 1, "val_accuracy": 0.5})
    assert not (tmp_path / "other" / reporting.HISTORY_FILE).exists()


def test_epoch_line_says_when_the_input_wait_cannot_be_measured():
    entry = {"epoch": 3, "phase": "phase2", "images_per_second": 120.4, "input_wait_fraction": None, "loss": 0.5,
             "accuracy": 0.75, "val_loss": 0.6, "val_accuracy": 0.7}
    line = reporting.format_epoch(entry, epochs=5, steps=10, elapsed=2.0)
    assert line.startswith("Epoch 3/5 (phase2) - 10 steps - 2.0s - 120 img/s - input wait n/a")
    assert "val_accuracy: 0.7000" in line
    assert reporting.format_fraction(0.25) == "25%"
