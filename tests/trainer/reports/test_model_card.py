"""trainer/reports/model_card.py: MODEL_CARD.md from the manifest, metrics and evaluation report; the Wilson interval."""

import pytest

from trainer.reports import model_card

CLASSES = ["cats", "dogs | wolves", "rare"]


def manifest(splits=("train", "validation", "test")) -> dict:
    counts = {"train": {"cats": 300, "dogs | wolves": 280, "rare": 20}, "validation": {"cats": 40, "dogs | wolves": 38, "rare": 4},
              "test": {"cats": 40, "dogs | wolves": 36, "rare": 4}}
    return {
        "input_dir": "/data/pets", "layout": "class_folders", "seed": 42, "max_side": 0, "classes": CLASSES,
        "splits": {split: {"num_examples": sum(counts[split].values()), "class_counts": counts[split]} for split in splits},
        "skipped": [{"path": f"/data/pets/cats/broken_{index}.jpg", "reason": "not an image (cannot identify image file)"}
                    for index in range(12)],
        "label_conflicts": [],
    }


def evaluation(split="test", total=80) -> dict:
    return {
        "split": split, "num_examples": total, "accuracy": 0.9, "top_k": 2, "top_k_accuracy": 0.975,
        "class_names": CLASSES,
        "per_class": [{"class": "cats", "precision": 0.95, "recall": 0.95, "f1": 0.95, "support": 40},
                      {"class": "dogs | wolves", "precision": 0.9, "recall": 0.94, "f1": 0.92, "support": 36},
                      {"class": "rare", "precision": 0.33, "recall": 0.25, "f1": 0.29, "support": 4}],
        "confusion_matrix": [[38, 2, 0], [1, 34, 1], [0, 3, 1]],
    }


def metrics(split="test") -> dict:
    return {"backbone": "efficientnet_lite0", "image_size": 224, "num_replicas": 1, "evaluated_split": split,
            "phases": {"phase1": {"validation_accuracy": 0.88}, "phase2": {"validation_accuracy": 0.91}},
            "restored_best_weights_of_epoch": 7,
            "history": [{"epoch": epoch, "phase": "phase1" if epoch <= 5 else "phase2", "val_accuracy": 0.8}
                        for epoch in range(1, 9)]}


def test_wilson_interval_known_values():
    assert model_card.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    low, high = model_card.wilson_interval(27, 27)
    assert low == pytest.approx(27 / (27 + model_card.WILSON_Z ** 2), abs=1e-6) and high == 1.0
    assert model_card.wilson_interval(0, 5)[0] == 0.0
    assert model_card.wilson_interval(0, 0) == (0.0, 1.0)


def test_card_states_data_results_failures_and_limits(tmp_path):
    (tmp_path / "flags.txt").write_text("--backbone=efficientnet_lite0\n--epochs=5\n")
    path = model_card.write_model_card(model_dir=str(tmp_path), manifest=manifest(), metrics=metrics(),
                                       evaluation=evaluation())
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert path == str(tmp_path / "MODEL_CARD.md")
    assert card.startswith("# Model card: efficientnet_lite0 image classifier, 3 classes")
    # Counts per class and split, a class name with a pipe kept whole in its table cell.
    assert "| dogs \\| wolves | 280 | 38 | 36 |" in card and "| **all** | 600 | 82 | 80 |" in card
    # Skipped files: the count, the first ten with their reasons, and how many more.
    assert "Files skipped while converting: 12" in card and "broken_9.jpg`: not an image" in card
    assert "broken_10.jpg" not in card and "... and 2 more" in card
    # The split, its size, the accuracy with its interval, and that the split chose nothing.
    low, high = model_card.wilson_interval(72, 80)
    assert f"Split: **test**, 80 images. Accuracy **0.9000** (72/80; 95% Wilson interval {low:.3f} to {high:.3f})" in card
    assert "used for nothing else" in card and "Selection-biased" not in card
    assert "Weights kept: epoch 7's, the best on the validation split" in card
    # Where it fails: the weakest class and the most frequent confusions, largest first.
    assert "Lowest recall: rare (0.2500 of 4 images)" in card
    assert "rare -> dogs \\| wolves: 3, cats -> dogs \\| wolves: 2" in card
    # Limits the data implies: the thin class, the imbalance, the closed set of classes.
    assert "fewer than 50 training images, likely the weakest: rare" in card
    assert "imbalanced (300 vs 20 training images)" in card and "always answers one of these classes" in card
    assert "No SavedModel in `saved_model/`" in card
    assert "--backbone=efficientnet_lite0\n--epochs=5" in card


def test_card_without_a_test_split_says_its_number_is_selection_biased(tmp_path):
    model_card.write_model_card(model_dir=str(tmp_path), manifest=manifest(splits=("train", "validation")),
                                metrics=metrics("validation"), evaluation=evaluation("validation", 82))
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "Split: **validation**, 82 images" in card and "**Selection-biased**" in card
    assert "| class | train | validation |" in card
    assert "No flags.txt in the model_dir" in card


def test_card_lists_each_tflite_file_with_its_tensors_as_the_interpreter_reports_them(tmp_path):
    import keras

    from trainer.exports import export

    inputs = keras.Input((8, 8, 3), name="image")
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs))
    export.export_tflite(model=keras.Model(inputs, outputs), class_names=CLASSES, image_size=8,
                         output_dir=str(tmp_path / export.TFLITE_DIR), quantization="float")
    model_card.write_model_card(model_dir=str(tmp_path), manifest=manifest(), metrics=metrics(), evaluation=evaluation())
    card = (tmp_path / "MODEL_CARD.md").read_text()
    line, = [line for line in card.splitlines() if line.startswith(f"- `{export.TFLITE_DIR}/")]
    assert line.startswith(f"- `{export.TFLITE_DIR}/{export.TFLITE_FILES['float']}`: inputs `")
    assert ": float32 [1, 8, 8, 3]; outputs `" in line and ": float32 [1, 3]" in line


def test_the_printed_accuracy_names_its_split_size_and_interval_and_flags_a_validation_split():
    statement = model_card.accuracy_statement({"evaluated_split": "test", "num_examples": 146, "accuracy": 145 / 146})
    assert statement == "test accuracy 0.9932 on 146 images (95% interval 0.962-0.999)"
    biased = model_card.accuracy_statement({"evaluated_split": "validation", "num_examples": 81, "accuracy": 0.5})
    assert biased.startswith("validation accuracy 0.5000 on 81 images (95% interval ") and "selection-biased" in biased
