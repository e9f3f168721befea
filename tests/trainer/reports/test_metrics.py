"""trainer/reports/metrics.py: metrics checked against numbers worked out by hand, the text table, and the PNG plots."""

import io

import numpy as np
import pytest
from PIL import Image

from trainer.reports import metrics

CLASS_NAMES = ["cat", "dog", "fox", "owl"]  # owl never occurs and is never predicted
# True labels and probabilities; the predicted class (argmax) is in the comment, then the top-2 classes.
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2])
PROBABILITIES = np.array([
    [0.70, 0.10, 0.10, 0.10],  # cat  right; top-2 {cat, .}  hit
    [0.60, 0.30, 0.05, 0.05],  # cat  right; top-2 hit
    [0.30, 0.50, 0.10, 0.10],  # dog  wrong; top-2 {dog, cat} hit
    [0.10, 0.80, 0.05, 0.05],  # dog  right; top-2 hit
    [0.50, 0.10, 0.15, 0.25],  # cat  wrong; top-2 {cat, owl} miss
    [0.10, 0.10, 0.70, 0.10],  # fox  right; top-2 hit
    [0.40, 0.35, 0.20, 0.05],  # cat  wrong; top-2 {cat, dog} miss
    [0.20, 0.10, 0.60, 0.10],  # fox  right; top-2 hit
])
# By hand: rows = true class, columns = predicted class.
CONFUSION_MATRIX = [
    [2, 1, 0, 0],
    [1, 1, 0, 0],
    [1, 0, 2, 0],
    [0, 0, 0, 0],
]
# precision = diagonal / column sum, recall = diagonal / row sum, F1 = 2PR / (P + R); 0 where undefined.
PRECISION = [2 / 4, 1 / 2, 2 / 2, 0.0]
RECALL = [2 / 3, 1 / 2, 2 / 3, 0.0]
F1 = [4 / 7, 1 / 2, 4 / 5, 0.0]
SUPPORT = [3, 2, 3, 0]


@pytest.fixture(scope="module")
def hand_made_report():
    return metrics.classification_report(
        labels=LABELS, probabilities=PROBABILITIES, class_names=CLASS_NAMES, top_k=2
    )


def test_report_matches_hand_computed_metrics(hand_made_report):
    result = hand_made_report
    assert result["num_examples"] == 8
    assert result["confusion_matrix"] == CONFUSION_MATRIX
    assert result["accuracy"] == pytest.approx(5 / 8)
    assert result["top_k"] == 2
    assert result["top_k_accuracy"] == pytest.approx(6 / 8)
    assert [row["class"] for row in result["per_class"]] == CLASS_NAMES
    assert [row["precision"] for row in result["per_class"]] == pytest.approx(PRECISION)
    assert [row["recall"] for row in result["per_class"]] == pytest.approx(RECALL)
    assert [row["f1"] for row in result["per_class"]] == pytest.approx(F1)
    assert [row["support"] for row in result["per_class"]] == SUPPORT
    # Macro: plain mean over all 4 classes, the absent owl included.
    assert result["macro_avg"] == pytest.approx(
        {"precision": 2 / 4, "recall": (2 / 3 + 1 / 2 + 2 / 3) / 4, "f1": (4 / 7 + 1 / 2 + 4 / 5) / 4, "support": 8}
    )
    # Weighted by support 3, 2, 3, 0 over 8 (weighted recall is the accuracy).
    assert result["weighted_avg"] == pytest.approx({
        "precision": (3 * 0.5 + 2 * 0.5 + 3 * 1.0) / 8,
        "recall": 5 / 8,
        "f1": (3 * 4 / 7 + 2 * 1 / 2 + 3 * 4 / 5) / 8,
        "support": 8,
    })
    assert result["class_names"] == CLASS_NAMES


def test_report_is_json_serialisable(hand_made_report):
    import json

    assert json.loads(json.dumps(hand_made_report)) == hand_made_report


def test_top_k_is_capped_at_the_number_of_classes():
    result = metrics.classification_report(labels=LABELS, probabilities=PROBABILITIES, class_names=CLASS_NAMES)
    assert result["top_k"] == 4 and result["top_k_accuracy"] == 1.0


def test_two_classes():
    labels = np.array([0, 1, 1, 0, 1])
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    result = metrics.classification_report(
        labels=labels, probabilities=probabilities, class_names=["no", "yes"], top_k=1
    )
    assert result["confusion_matrix"] == [[1, 1], [1, 2]]
    assert result["accuracy"] == result["top_k_accuracy"] == pytest.approx(3 / 5)
    assert [row["precision"] for row in result["per_class"]] == pytest.approx([1 / 2, 2 / 3])
    wide = metrics.classification_report(labels=labels, probabilities=probabilities, class_names=["no", "yes"])
    assert wide["top_k"] == 2 and wide["top_k_accuracy"] == 1.0


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(class_names=["cat", "dog"]), "2 class names"),
        (dict(top_k=0), "--top_k 0 must be at least 1"),
        (dict(labels=np.array([0, 1])), r"labels have shape \(2,\); expected \[8\]"),
        (dict(labels=LABELS - 1), r"labels range over \[-1, 1\]"),
        (dict(labels=np.array([0, 1, 2, 3, 4, 0, 1, 2])), r"expected class ids in \[0, 4\)"),
    ],
)
def test_report_rejects_bad_input(arguments, message):
    with pytest.raises(ValueError, match=message):
        metrics.classification_report(
            **{"labels": LABELS, "probabilities": PROBABILITIES, "class_names": CLASS_NAMES, **arguments}
        )


def test_format_report_lists_classes_averages_and_matrix(hand_made_report):
    text = metrics.format_report(hand_made_report)
    for expected in [*CLASS_NAMES, "precision", "accuracy", "top-2 accuracy", "macro avg", "weighted avg",
                     "confusion matrix", "0.6250", "0.7500"]:
        assert expected in text
    lines = text.splitlines()
    cat_row = next(line for line in lines if line.strip().startswith("cat ") and "0.5000" in line)
    assert cat_row.split() == ["cat", "0.5000", "0.6667", "0.5714", "3"]
    matrix_rows = lines[lines.index("confusion matrix (rows: true class, columns: predicted class)") + 2:]
    assert [row.split() for row in matrix_rows] == [[name, *map(str, counts)] for name, counts in
                                                      zip(CLASS_NAMES, CONFUSION_MATRIX)]


def read_png(path) -> Image.Image:
    image = Image.open(io.BytesIO(path.read_bytes()))
    image.load()
    assert image.format == "PNG"
    return image


def test_plot_confusion_matrix_scales_with_classes(tmp_path, hand_made_report):
    metrics.plot_confusion_matrix(
        matrix=hand_made_report["confusion_matrix"], class_names=CLASS_NAMES, path=str(tmp_path / "small.png")
    )
    many_names = [f"class_{index}" for index in range(50)]
    matrix = np.diag(np.arange(1, 51))  # zero cells stay blank above 20 classes
    metrics.plot_confusion_matrix(matrix=matrix, class_names=many_names, path=str(tmp_path / "large.png"))
    small, large = read_png(tmp_path / "small.png"), read_png(tmp_path / "large.png")
    assert 200 < small.width < 1200 and 200 < small.height < 1200
    assert large.width > 2 * small.width and large.height > 2 * small.height
    with pytest.raises(ValueError, match=r"confusion matrix of shape \(4, 4\) for 3 class names"):
        metrics.plot_confusion_matrix(matrix=CONFUSION_MATRIX, class_names=CLASS_NAMES[:3], path=str(tmp_path / "x.png"))


def uniform_images(count: int) -> np.ndarray:
    """Images whose every pixel holds the image's index, so a kept image can be identified."""
    return np.arange(count, dtype=np.float32)[:, None, None, None] * np.ones([count, 8, 8, 3], np.float32)


def test_worst_errors_keeps_the_most_confident_errors_across_batches():
    worst = metrics.WorstErrors(2)
    # Errors at confidence 0.6 (image 0) and 0.9 (image 2); image 1 is right, at 0.99.
    worst.add(uniform_images(3), np.array([0, 1, 0]), np.array([[0.4, 0.6], [0.01, 0.99], [0.1, 0.9]]))
    # Errors at 0.8 (image 10) and 0.55 (image 11).
    worst.add(uniform_images(12)[10:], np.array([1, 0]), np.array([[0.8, 0.2], [0.45, 0.55]]))
    assert len(worst) == 2
    assert worst.images[:, 0, 0, 0].tolist() == [2.0, 10.0]
    assert worst.labels.tolist() == [0, 1]
    np.testing.assert_allclose(worst.probabilities, [[0.1, 0.9], [0.8, 0.2]])


def test_plot_errors_titles_worst_first(tmp_path):
    figure = metrics.plot_errors(
        images=uniform_images(8) * 30, labels=LABELS, probabilities=PROBABILITIES, class_names=CLASS_NAMES,
        path=str(tmp_path / "errors.png"), max_images=2,
    )
    titles = [axes.get_title() for axes in figure.axes]
    # Examples 2 and 4 are wrong at 0.50, example 6 at 0.40; equal confidences keep their order.
    assert titles == ["true: cat / predicted: dog (0.50)", "true: dog / predicted: cat (0.50)"]
    image = read_png(tmp_path / "errors.png")
    assert 200 < image.width < 2000 and 150 < image.height < 2000


def test_plot_errors_without_errors_says_so(tmp_path):
    figure = metrics.plot_errors(
        images=uniform_images(2), labels=np.array([0, 1]), probabilities=np.array([[0.9, 0.1], [0.2, 0.8]]),
        class_names=["a", "b"], path=str(tmp_path / "errors.png"),
    )
    assert [text.get_text() for text in figure.texts] == ["no misclassified images"]
    image = read_png(tmp_path / "errors.png")
    assert 50 < image.width < 800 and 20 < image.height < 400


def make_history(phase1_epochs: int, phase2_epochs: int) -> list[dict]:
    history = []
    for epoch in range(1, phase1_epochs + phase2_epochs + 1):
        history.append({
            "epoch": epoch, "phase": "phase1" if epoch <= phase1_epochs else "phase2",
            "loss": 1.0 / epoch, "accuracy": 1.0 - 0.5 / epoch, "val_loss": 1.2 / epoch,
            "val_accuracy": 1.0 - 0.6 / epoch, "learning_rate": 1e-3, "images_per_second": 100.0,
            "input_wait_fraction": None,
        })
    return history


@pytest.mark.parametrize("phase1_epochs, phase2_epochs, marker_epoch", [(3, 2, 3), (4, 0, None)])
def test_learning_curves(tmp_path, phase1_epochs, phase2_epochs, marker_epoch):
    path = tmp_path / "learning_curves.png"
    figure = metrics.plot_learning_curves(history=make_history(phase1_epochs, phase2_epochs), path=str(path))
    assert len(figure.axes) == 2
    for axes, metric in zip(figure.axes, ["accuracy", "loss"]):
        lines = {line.get_label(): line for line in axes.get_lines()}
        assert {f"training {metric}", f"validation {metric}"} <= set(lines)
        assert list(lines[f"training {metric}"].get_xdata()) == list(range(1, phase1_epochs + phase2_epochs + 1))
        if marker_epoch is None:
            assert "start fine-tuning" not in lines
        else:
            assert list(lines["start fine-tuning"].get_xdata()) == [marker_epoch, marker_epoch]
    image = read_png(path)
    assert 400 < image.width < 1500 and 400 < image.height < 1500
    with pytest.raises(ValueError, match="history is empty"):
        metrics.plot_learning_curves(history=[], path=str(path))


# Folder names that matplotlib's math text would typeset or fail to parse ("$x^$" raised ValueError).
ODD_CLASS_NAMES = ["$x^$", "$\\foo$", "$a{b$", "$%$", "100%", "{braces}", "日本語", "a_b^c"]


def test_plots_show_any_class_name_as_it_is(tmp_path):
    num_classes = len(ODD_CLASS_NAMES)
    figure = metrics.plot_confusion_matrix(
        matrix=np.eye(num_classes, dtype=int) * 3, class_names=ODD_CLASS_NAMES, path=str(tmp_path / "matrix.png")
    )
    assert Image.open(tmp_path / "matrix.png").size[0] > 100
    assert metrics.figure_png(figure).startswith(b"\x89PNG")
    labels = np.arange(4)
    probabilities = np.full((4, num_classes), 0.01)
    probabilities[:, 5] = 0.9
    metrics.plot_errors(images=np.zeros((4, 16, 16, 3)), labels=labels, probabilities=probabilities,
                       class_names=ODD_CLASS_NAMES, path=str(tmp_path / "errors.png"))
    assert (tmp_path / "errors.png").stat().st_size > 0


@pytest.mark.parametrize("num_classes, top_k", [(2, 1), (2, 2), (7, 1), (7, 3), (40, 5)])
def test_counted_batches_give_sklearns_report(num_classes, top_k):
    """evaluate_model counts batches (metrics.Counts) instead of holding the split's probabilities (issue 26):
    the same numbers as sklearn.metrics over the whole arrays, ties in the top k included."""
    from sklearn import metrics as sklearn_metrics

    rng = np.random.default_rng(num_classes)
    labels = rng.integers(0, num_classes - 1, 500)  # the last class never occurs: zero support
    probabilities = rng.dirichlet(np.ones(num_classes), 500)
    probabilities[::7] = np.round(probabilities[::7], 1)  # ties
    counts = metrics.Counts(num_classes=num_classes, top_k=top_k)
    for start in range(0, 500, 64):
        counts.add(labels[start : start + 64], probabilities[start : start + 64])
    result = counts.report([f"c{i}" for i in range(num_classes)])
    class_ids = list(range(num_classes))
    predictions = probabilities.argmax(axis=1)
    assert result["confusion_matrix"] == sklearn_metrics.confusion_matrix(labels, predictions, labels=class_ids).tolist()
    scores = probabilities[:, 1] if num_classes == 2 else probabilities
    assert result["top_k_accuracy"] == pytest.approx(
        sklearn_metrics.top_k_accuracy_score(labels, scores, k=min(top_k, num_classes), labels=class_ids))
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        labels, predictions, labels=class_ids, zero_division=0)
    assert [row["f1"] for row in result["per_class"]] == pytest.approx(f1.tolist())
    assert [row["precision"] for row in result["per_class"]] == pytest.approx(precision.tolist())
    for kind in ("macro", "weighted"):
        expected = sklearn_metrics.precision_recall_fscore_support(labels, predictions, labels=class_ids, average=kind,
                                                           zero_division=0)
        assert [result[f"{kind}_avg"][name] for name in ("precision", "recall", "f1")] == pytest.approx(expected[:3])


def test_a_confusion_matrix_of_hundreds_of_classes_stays_a_bounded_figure(tmp_path):
    names = [f"class_{index}" for index in range(300)]
    matrix = np.diag(np.full(300, 5))
    figure = metrics.plot_confusion_matrix(matrix=matrix, class_names=names, path=str(tmp_path / "matrix.png"))
    width, height = figure.get_size_inches()
    assert max(width, height) <= metrics.MAX_PLOT_SIDE + 1 and len(figure.axes[0].texts) == 0
    assert (tmp_path / "matrix.png").stat().st_size > 0
