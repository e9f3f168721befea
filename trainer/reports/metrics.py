"""Evaluation reports: classification metrics, their text table, and PNG plots.

Pure functions over numpy arrays (labels, probabilities, images) and the training history; trainer/evaluate.py
streams a split through a model and calls them. The metrics are counted (Counts: what sklearn.metrics gives, from
the confusion matrix, in memory that does not grow with the split); the plots are drawn on
matplotlib Figure objects (no pyplot, so no global state) and written through tf.io.gfile, so gs:// works.
"""

import functools
import io
import math

import matplotlib
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# Confusion-matrix cells hold their count up to this many classes; above it only non-zero counts, so the
# diagonal and the real confusions stand out instead of a wall of zeros.
MAX_CLASSES_WITH_ZERO_COUNTS = 20
# Past these many classes the confusion-matrix plot keeps colours only (no count in each cell), and past
# MAX_CLASSES_WITH_NAMES no class names on its axes; its side stays at most MAX_PLOT_SIDE inches. Memory and time
# grew with the cells' text: 3.9 GB and 27 s at 300 classes (a 122-inch figure, 90,000 labels).
MAX_CLASSES_WITH_CELL_COUNTS = 60
MAX_CLASSES_WITH_NAMES = 100
MAX_PLOT_SIDE = 30.0
# Column width of the text confusion matrix: longer class names are cut in its header.
MAX_COLUMN_NAME_LENGTH = 10


def classification_report(
    *, labels: np.ndarray, probabilities: np.ndarray, class_names: list[str], top_k: int = 5
) -> dict:
    """Computes accuracy, top-k accuracy, per-class and averaged precision/recall/F1 and the confusion matrix.

    Args:
        labels: int [n] true class ids.
        probabilities: float [n, num_classes] predicted probabilities; the prediction is their argmax.
        class_names: num_classes names in class-id order.
        top_k: k of the top-k accuracy; capped at num_classes.

    Returns:
        A JSON-serialisable dict: num_examples, accuracy, top_k (the k used), top_k_accuracy, per_class
        (a list of {class, precision, recall, f1, support}), macro_avg and weighted_avg ({precision, recall,
        f1, support}), confusion_matrix (rows: true class, columns: predicted class) and class_names.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities have shape {probabilities.shape}; expected [num_examples, num_classes]")
    num_examples, num_classes = probabilities.shape
    if labels.shape != (num_examples,):
        raise ValueError(f"labels have shape {labels.shape}; expected [{num_examples}], one per row of probabilities")
    if num_examples == 0:
        raise ValueError("no examples to report on; check that the split is not empty")
    if len(class_names) != num_classes:
        raise ValueError(
            f"{len(class_names)} class names {list(class_names)[:5]}... for {num_classes} probability columns; "
            "pass the names of the data the model was trained on"
        )
    if num_classes < 2:
        raise ValueError(f"{num_classes} class; a classification report needs at least 2")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels range over [{labels.min()}, {labels.max()}]; expected class ids in [0, {num_classes})"
        )
    if top_k < 1:
        raise ValueError(f"--top_k {top_k} must be at least 1")
    counts = Counts(num_classes=num_classes, top_k=top_k)
    counts.add(labels, probabilities)
    return counts.report(class_names)


class Counts:
    """What a classification report needs of a stream of batches: the confusion matrix and the top-k hits.

    Memory is num_classes^2 counts whatever the number of images (evaluate_model streams a split through it; the
    whole split's probabilities, 24 bytes x images x classes with the copies sklearn made, are never held).
    """

    def __init__(self, *, num_classes: int, top_k: int):
        self.num_classes, self.top_k = num_classes, min(top_k, num_classes)
        self.confusion = np.zeros((num_classes, num_classes), np.int64)
        self.top_k_hits = 0

    def add(self, labels: np.ndarray, probabilities: np.ndarray) -> None:
        """Counts a batch: int [n] true class ids, float [n, num_classes] probabilities (argmax: the prediction)."""
        labels = np.asarray(labels, np.int64)
        probabilities = np.asarray(probabilities)
        predictions = probabilities.argmax(axis=1)
        np.add.at(self.confusion, (labels, predictions), 1)
        self.top_k_hits += int(top_k_hits(labels, probabilities, self.top_k).sum())

    def report(self, class_names: list[str]) -> dict:
        """The report of everything added: see classification_report."""
        confusion = self.confusion
        num_examples = int(confusion.sum())
        if num_examples == 0:
            raise ValueError("no examples to report on; check that the split is not empty")
        correct = np.diag(confusion).astype(np.float64)
        support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
        # 0 where undefined (no image of, or predicted as, the class), as sklearn's zero_division=0.
        precision = np.divide(correct, predicted, out=np.zeros_like(correct), where=predicted > 0)
        recall = np.divide(correct, support, out=np.zeros_like(correct), where=support > 0)
        both = precision + recall
        f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(correct), where=both > 0)

        def average(weights):
            return {"precision": float(np.average(precision, weights=weights)),
                    "recall": float(np.average(recall, weights=weights)),
                    "f1": float(np.average(f1, weights=weights)), "support": num_examples}

        return {
            "num_examples": num_examples,
            "accuracy": float(correct.sum() / num_examples),
            "top_k": int(self.top_k),
            "top_k_accuracy": self.top_k_hits / num_examples,
            "per_class": [
                {"class": name, "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                 "support": int(support[i])}
                for i, name in enumerate(class_names)
            ],
            # Macro: every class counts once, absent ones included; weighted: by support.
            "macro_avg": average(None),
            "weighted_avg": average(support),
            "confusion_matrix": confusion.tolist(),
            "class_names": list(class_names),
        }


def top_k_hits(labels: np.ndarray, probabilities: np.ndarray, k: int) -> np.ndarray:
    """Whether each true class is among the k most probable, with sklearn's top_k_accuracy_score's rules: among
    equal probabilities the higher class id ranks first; two classes and k = 1: class 1 when its probability
    is above 0.5."""
    num_classes = probabilities.shape[1]
    if num_classes == 2:
        return (probabilities[:, 1] > 0.5) == (labels == 1) if k == 1 else np.ones(len(labels), bool)
    true_probability = probabilities[np.arange(len(labels)), labels][:, np.newaxis]
    ranks_above = (probabilities > true_probability) | (
        (probabilities == true_probability) & (np.arange(num_classes) > labels[:, np.newaxis]))
    return ranks_above.sum(axis=1) < k


def format_report(report: dict) -> str:
    """Formats a classification_report dict as a fixed-width table (like sklearn's) and the confusion matrix."""
    names = report["class_names"]
    row_labels = [*names, "accuracy", f"top-{report['top_k']} accuracy", "macro avg", "weighted avg"]
    width = max(len(label) for label in row_labels)
    header = f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}"

    def row(label, scores):
        values = "".join(f" {scores[key]:>9.4f}" for key in ("precision", "recall", "f1"))
        return f"{label:>{width}}{values} {scores['support']:>9}"

    def single(label, value):
        return f"{label:>{width}} {'':>9} {'':>9} {value:>9.4f} {report['num_examples']:>9}"

    lines = [header, ""]
    lines += [row(scores["class"], scores) for scores in report["per_class"]]
    lines += [
        "",
        single("accuracy", report["accuracy"]),
        single(f"top-{report['top_k']} accuracy", report["top_k_accuracy"]),
        row("macro avg", report["macro_avg"]),
        row("weighted avg", report["weighted_avg"]),
        "",
        "confusion matrix (rows: true class, columns: predicted class)",
    ]
    matrix = report["confusion_matrix"]
    name_width = max(len(name) for name in names)
    largest_count = max(max(counts) for counts in matrix)
    column_width = max(len(str(largest_count)), min(max(len(name) for name in names), MAX_COLUMN_NAME_LENGTH))
    lines.append(f"{'':>{name_width}}" + "".join(f" {name[:column_width]:>{column_width}}" for name in names))
    for name, counts in zip(names, matrix):
        lines.append(f"{name:>{name_width}}" + "".join(f" {count:>{column_width}}" for count in counts))
    return "\n".join(lines) + "\n"


def plain_text(function):
    """Runs a plotting function with matplotlib's math text off: a class name is shown as it is.

    With it on, a folder name such as "$x^2$" is typeset, and one with a single "$" or a "^" crashes the
    plot. Tick labels are made when the figure is drawn, so rendering needs it too (figure_png).
    """

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with matplotlib.rc_context({"text.parse_math": False}):
            return function(*args, **kwargs)

    return wrapped


@plain_text
def figure_png(figure: Figure) -> bytes:
    """Renders a figure to PNG bytes (also what TensorBoard image summaries are made of)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def write_png(figure: Figure, path: str | None) -> None:
    """Writes a figure as a PNG file with tf.io.gfile (local or gs://); None writes nothing."""
    if path is None:
        return
    with tf.io.gfile.GFile(path, "wb") as file:
        file.write(figure_png(figure))


@plain_text
def plot_confusion_matrix(*, matrix, class_names: list[str], path: str | None) -> Figure:
    """Plots a confusion matrix: counts in the cells, colours normalised per true class (row).

    Args:
        matrix: [num_classes, num_classes] counts, rows = true class, columns = predicted class.
        class_names: names in class-id order.
        path: the PNG to write (local or gs://); None: only return the figure.

    Returns:
        The figure (already written).
    """
    matrix = np.asarray(matrix)
    num_classes = len(class_names)
    if matrix.shape != (num_classes, num_classes):
        raise ValueError(f"confusion matrix of shape {matrix.shape} for {num_classes} class names; expected square")
    row_totals = matrix.sum(axis=1, keepdims=True)
    # Row shares, so a rare class's errors are as visible as a common one's; an absent class stays white.
    shares = np.divide(matrix, row_totals, out=np.zeros(matrix.shape, dtype=np.float64), where=row_totals > 0)
    side = min(MAX_PLOT_SIDE, max(4.0, 0.4 * num_classes + 2.0))  # inches: about 0.4 per class keeps 50 names legible
    font_size = 10 if num_classes <= 10 else 8  # 8 points still fit a 4-digit count in a 0.4-inch cell
    figure = Figure(figsize=(side + 1.0, side))
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = np.arange(num_classes)
    few = num_classes <= 5  # few labels fit slanted; many need to stand upright to not overlap
    if num_classes <= MAX_CLASSES_WITH_NAMES:
        axes.set_xticks(ticks, labels=class_names, rotation=45 if few else 90, ha="right" if few else "center",
                        fontsize=font_size)
        axes.set_yticks(ticks, labels=class_names, fontsize=font_size)
    axes.set_xlabel("Predicted")
    axes.set_ylabel("True")
    axes.set_title("Confusion matrix" + ("" if num_classes <= MAX_CLASSES_WITH_CELL_COUNTS else
                                         " (counts in evaluation.txt and evaluation.json)"))
    for true_id in range(num_classes if num_classes <= MAX_CLASSES_WITH_CELL_COUNTS else 0):
        for predicted_id in range(num_classes):
            count = int(matrix[true_id, predicted_id])
            if count == 0 and num_classes > MAX_CLASSES_WITH_ZERO_COUNTS:
                continue
            color = "white" if shares[true_id, predicted_id] > 0.5 else "black"
            axes.text(predicted_id, true_id, str(count), ha="center", va="center", color=color, fontsize=font_size)
    write_png(figure, path)
    return figure


class WorstErrors:
    """Keeps the `capacity` most confident misclassifications seen so far, across streamed batches.

    An evaluation pass can then plot its worst errors without holding every image in memory.
    """

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"--max_error_images {capacity} must be 0 or more")
        self.capacity = capacity
        self.images = None
        self.labels = np.zeros([0], dtype=np.int64)
        self.probabilities = None

    def add(self, images, labels, probabilities) -> None:
        """Adds a batch: float [b, h, w, 3] images, int [b] labels, float [b, num_classes] probabilities."""
        images, labels, probabilities = np.asarray(images), np.asarray(labels), np.asarray(probabilities)
        wrong = probabilities.argmax(axis=1) != labels
        if self.images is None:
            self.images = np.zeros([0, *images.shape[1:]], dtype=images.dtype)
            self.probabilities = np.zeros([0, probabilities.shape[1]], dtype=probabilities.dtype)
        self.images = np.concatenate([self.images, images[wrong]])
        self.labels = np.concatenate([self.labels, labels[wrong]])
        self.probabilities = np.concatenate([self.probabilities, probabilities[wrong]])
        # Stable: among equally confident errors the earliest seen stay.
        keep = np.argsort(-self.probabilities.max(axis=1), kind="stable")[: self.capacity]
        self.images, self.labels, self.probabilities = self.images[keep], self.labels[keep], self.probabilities[keep]

    def __len__(self) -> int:
        return len(self.labels)


@plain_text
def plot_errors(*, images, labels, probabilities, class_names: list[str], path: str, max_images: int = 16) -> Figure:
    """Plots the most confident misclassified images, worst first, each titled with true and predicted class.

    Args:
        images: float [n, height, width, 3] pixels in [0, 255].
        labels: int [n] true class ids.
        probabilities: float [n, num_classes] predicted probabilities.
        class_names: names in class-id order.
        path: the PNG to write (local or gs://).
        max_images: most images plotted.

    Returns:
        The figure (already written); it says "no misclassified images" when there are none.
    """
    worst = WorstErrors(max_images)
    if len(labels):
        worst.add(images, labels, probabilities)
    if not len(worst):
        figure = Figure(figsize=(4, 1.5))
        figure.text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=12)
        write_png(figure, path)
        return figure
    count = len(worst)
    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(3.5 * columns, 3.5 * rows))  # wide enough for two class names per title
    for index in range(count):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.imshow(np.clip(worst.images[index], 0, 255).astype(np.uint8))
        predicted = int(worst.probabilities[index].argmax())
        confidence = float(worst.probabilities[index, predicted])
        axes.set_title(
            f"true: {class_names[worst.labels[index]]} / predicted: {class_names[predicted]} ({confidence:.2f})",
            fontsize=8,
        )
        axes.axis("off")
    figure.suptitle("Most confident errors")
    write_png(figure, path)
    return figure


@plain_text
def plot_quality(*, issues: list, pairs: list, thumbnails: dict, path: str) -> Figure:
    """Plots the top suspects of a data-quality report: likely label errors, then near-duplicate pairs.

    Args:
        issues: the report's label issues to show ({"path", "given", "suggested", "score"}).
        pairs: the report's near-duplicate pairs to show ({"paths", "splits", "similarity"}).
        thumbnails: source path -> uint8 [h, w, 3] image (a path missing here is drawn as its name only).
        path: the PNG to write (local or gs://).

    Returns:
        The figure (already written).
    """
    panels = [(issue["path"], f"{issue['path']}\ngiven {issue['given']} / looks like {issue['suggested']} "
               f"({issue['score']:.2f})") for issue in issues]
    for pair in pairs:
        for index in range(2):
            panels.append((pair["paths"][index], f"{pair['splits'][index]}: {pair['paths'][index]}\n"
                           f"near-duplicate pair, similarity {pair['similarity']:.3f}"))
    if not panels:
        figure = Figure(figsize=(4, 1.5))
        figure.text(0.5, 0.5, "no likely label errors or near-duplicates", ha="center", va="center", fontsize=12)
        write_png(figure, path)
        return figure
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(3.5 * columns, 3.7 * rows))
    for index, (source, title) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        if source in thumbnails:
            axes.imshow(thumbnails[source])
        axes.set_title(title, fontsize=7)
        axes.axis("off")
    figure.suptitle("Data quality: likely label errors, then near-duplicate pairs (two panels each)")
    write_png(figure, path)
    return figure


@plain_text
def plot_learning_curves(*, history: list[dict], path: str) -> Figure:
    """Plots training and validation accuracy and loss per epoch, across both phases.

    Args:
        history: the list in <model_dir>/history.json: per epoch a dict with epoch (1-based, continuing
            across phases), phase ("phase1" or "phase2"), accuracy, val_accuracy, loss and val_loss.
        path: the PNG to write (local or gs://).

    Returns:
        The figure (already written). A dashed line labelled "start fine-tuning" marks the end of the last
        phase-1 epoch when the history has phase-2 epochs.
    """
    if not history:
        raise ValueError("the training history is empty; train at least one epoch first")
    history = sorted(history, key=lambda entry: entry["epoch"])
    epochs = [entry["epoch"] for entry in history]
    phase2_epochs = [entry["epoch"] for entry in history if entry["phase"] != "phase1"]  # phase2, phase2-stage2, ...
    fine_tuning_start = min(phase2_epochs) - 1 if phase2_epochs else epochs[0]
    figure = Figure(figsize=(8, 8))
    for index, (metric, title) in enumerate([("accuracy", "Accuracy"), ("loss", "Loss")]):
        axes = figure.add_subplot(2, 1, index + 1)
        for key, label in [(metric, f"training {metric}"), (f"val_{metric}", f"validation {metric}")]:
            # None: a value the run did not record; those epochs are left out rather than drawn as 0.
            points = [(entry["epoch"], entry[key]) for entry in history if entry.get(key) is not None]
            if points:
                axes.plot(*zip(*points), marker="o", markersize=3, label=label)
        if phase2_epochs:
            # Where the Keras transfer-learning tutorial draws it: at the last epoch before fine-tuning.
            axes.axvline(fine_tuning_start, color="gray", linestyle="--", label="start fine-tuning")
        axes.set_title(f"Training and validation {metric}")
        axes.set_ylabel(title)
        axes.set_xlim(min(epochs[0], fine_tuning_start) - 0.5, epochs[-1] + 0.5)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(loc="lower right" if metric == "accuracy" else "upper right")
    figure.axes[-1].set_xlabel("epoch")
    write_png(figure, path)
    return figure
