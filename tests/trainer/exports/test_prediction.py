"""trainer/exports/prediction.py: batched labelling, path expansion, bad files, CSV/JSON/table output, CLI exit codes."""

import csv
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc
import uuid
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.trainer.exports import test_export
from trainer.exports import export
from trainer.exports import listing
from trainer.exports import output_files
from trainer.exports import prediction
from trainer.models import classifier

CLASS_NAMES = ["cat", "dog", "fox", "owl"]
IMAGE_SIZE = 32
REPO_ROOT = Path(__file__).resolve().parents[3]
ONNX_INSTALLED = all(importlib.util.find_spec(name) for name in ("tf2onnx", "onnx", "onnxruntime"))
# Every format trainer.predict runs (ONNX only with the onnx extra installed).
EXPORT_FORMATS = ["saved_model", "tflite", "onnx"] if ONNX_INSTALLED else ["saved_model", "tflite"]
# Where each format's own class names are, as the error that finds them disagreeing with labels.txt names it.
NAMES_SOURCES = {"saved_model": "the SavedModel", "tflite": "tflite/labels.txt", "onnx": "model.onnx"}


@pytest.fixture(scope="module")
def small_model():
    """An untrained 4-class mobilenet_v2 at 32x32 with a random head."""
    model = classifier.build_model(
        classifier.ModelSpec(
            backbone="mobilenet_v2", image_size=IMAGE_SIZE, weights="none", preprocess="tf", dropout=0.0,
        ),
        num_classes=len(CLASS_NAMES),
    )
    # A random head, so the probabilities differ between classes and the top-k order means something (the
    # untrained backbone's features are near zero whatever the image, so the head's bias decides).
    head = model.layers[-1]
    rng = np.random.default_rng(0)
    head.set_weights([rng.normal(0, 1, weight.shape).astype("float32") for weight in head.get_weights()])
    return model


def export_model_dir(folder: Path, model, top_k: int = export.DEFAULT_TOP_K) -> Path:
    export.export_saved_model(model=model, class_names=CLASS_NAMES, image_size=IMAGE_SIZE,
                              export_dir=str(folder / export.SAVED_MODEL_DIR), top_k=top_k)
    (folder / prediction.LABELS_FILE).write_text("".join(name + "\n" for name in CLASS_NAMES))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, small_model):
    """A --model_dir holding an exported 4-class model and its labels.txt."""
    return export_model_dir(tmp_path_factory.mktemp("model_dir"), small_model)


@pytest.fixture(scope="module")
def top_1_model_dir(tmp_path_factory, small_model):
    """The same, exported as `trainer.train --top_k=1` does: its signature names only the best class."""
    return export_model_dir(tmp_path_factory.mktemp("top_1_model_dir"), small_model, top_k=1)


@pytest.fixture(scope="module")
def exports_dir(tmp_path_factory):
    """A --model_dir with every export a training run writes (SavedModel, float TFLite, ONNX when installed), by
    export.export_run, of a small classifier whose probabilities follow the pixels (tests/test_export.py's)."""
    images = test_export.prepare([test_export.encode(seed, "JPEG", size=(40, 50 + 9 * seed), smooth=True)
                                  for seed in range(6)])
    model = test_export.build_small_classifier(images)
    folder = tmp_path_factory.mktemp("exports")
    export.export_run(model=model, class_names=test_export.CLASS_NAMES, model_dir=str(folder),
                      options=export.ExportOptions(tflite=("float",), onnx=ONNX_INSTALLED),
                      strategy=tf.distribute.get_strategy())
    return folder


def copy_run(model_dir: Path, destination: Path) -> Path:
    shutil.copytree(model_dir, destination)
    return destination


def write_labels(folder: Path, class_names: list[str]) -> None:
    (folder / prediction.LABELS_FILE).write_text("".join(name + "\n" for name in class_names))


@pytest.fixture(scope="module")
def serve(model_dir):
    return export.load_serving_function(str(model_dir / export.SAVED_MODEL_DIR))


def encode(seed: int, image_format: str = "PNG", size=(40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def write_images(folder, names: list[str]) -> list[str]:
    paths = []
    for seed, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(seed, "JPEG" if name.endswith(".jpg") else "PNG"))
        paths.append(str(path))
    return paths


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.predict", *arguments], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=120,
    )


def error_lines(stderr: str) -> list[str]:
    # TensorFlow's C++ start-up messages also go to stderr; the program's own lines start with "error:".
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def check_sorted_top_k(result: dict, top_k: int) -> None:
    probabilities = [entry["probability"] for entry in result["top_k"]]
    assert len(result["top_k"]) == top_k
    assert probabilities == sorted(probabilities, reverse=True)
    assert result["top_k"][0] == {"class_name": result["class_name"], "probability": result["probability"]}
    assert len({entry["class_name"] for entry in result["top_k"]}) == top_k


def test_batched_results_equal_one_image_per_call(serve, tmp_path):
    paths = write_images(tmp_path, [f"image{index}.{'jpg' if index % 2 else 'png'}" for index in range(7)])
    results, failures = prediction.predict_files(
        serve=serve, paths=paths, class_names=CLASS_NAMES, top_k=10, batch_size=3, num_read_threads=2
    )
    assert failures == {}
    assert [result["path"] for result in results] == paths
    for path, result in zip(paths, results):
        outputs = serve(image_bytes=tf.constant([prediction.read_image(path)]))
        assert result["class_name"] == outputs["class_names"][0].numpy().decode()
        np.testing.assert_allclose(
            [entry["probability"] for entry in result["top_k"]],
            np.sort(outputs["probabilities"][0].numpy())[::-1], rtol=1e-4, atol=1e-6,
        )
        check_sorted_top_k(result, top_k=len(CLASS_NAMES))  # 10 clipped to the class count


def test_predict_files_rejects_bad_arguments(serve):
    with pytest.raises(ValueError, match="--top_k 0 must be at least 1"):
        prediction.predict_files(serve=serve, paths=[], class_names=CLASS_NAMES, top_k=0, batch_size=1)
    with pytest.raises(ValueError, match="--batch_size 0 must be at least 1"):
        prediction.predict_files(serve=serve, paths=[], class_names=CLASS_NAMES, top_k=1, batch_size=0)


def test_labels_that_do_not_match_the_model_are_a_clear_error(serve, tmp_path):
    (path,) = write_images(tmp_path, ["one.png"])
    with pytest.raises(ValueError, match="outputs 4 class probabilities but labels.txt lists 2"):
        prediction.predict_files(serve=serve, paths=[path], class_names=["a", "b"], top_k=1, batch_size=1)


def test_list_images_expands_folders_and_globs(tmp_path):
    write_images(tmp_path, [
        "photos/b.png", "photos/a.jpg", "photos/.hidden.png", "photos/nested/c.png", "photos/.cache/d.png",
        "loose1.png", "loose2.png", ".loose3.png", "globbed/e.png",
    ])
    found = listing.list_images([
        str(tmp_path / "photos"), str(tmp_path / "loose*.png"), str(tmp_path / "photos" / "a.jpg"),
        str(tmp_path / "glob*"),
    ])
    assert [path.replace(str(tmp_path), "") for path in found] == [
        "/photos/a.jpg", "/photos/b.png", "/photos/nested/c.png", "/loose1.png", "/loose2.png", "/globbed/e.png",
    ]
    # A hidden file named explicitly is kept.
    assert listing.list_images([str(tmp_path / ".loose3.png")]) == [str(tmp_path / ".loose3.png")]
    with pytest.raises(ValueError, match="neither a file, a folder nor a glob"):
        listing.list_images([str(tmp_path / "missing*.jpg")])
    (tmp_path / "empty" / ".only_hidden").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no files"):
        listing.list_images([str(tmp_path / "empty")])


def test_corrupt_file_among_good_ones_is_reported_and_the_rest_labelled(model_dir, serve, tmp_path):
    images = tmp_path / "images"
    good = write_images(images, ["a.png", "b.jpg", "d.png", "e.png"])
    (images / "c.jpg").write_bytes(b"not an image")
    (images / "empty.png").write_bytes(b"")
    bad = [str(images / "c.jpg"), str(images / "empty.png")]
    results, failures = prediction.predict_files(
        serve=serve, paths=listing.list_images([str(images)]), class_names=CLASS_NAMES, top_k=2, batch_size=4
    )
    assert [result["path"] for result in results] == good
    assert failures == {path: "not a decodable image" for path in bad}
    vanished = str(images / "vanished.png")  # listed, then deleted before it was read
    results, failures = prediction.predict_files(
        serve=serve, paths=[vanished, good[0]], class_names=CLASS_NAMES, top_k=2, batch_size=4
    )
    assert [result["path"] for result in results] == good[:1]
    assert list(failures) == [vanished] and failures[vanished].startswith("cannot be read (")

    output = tmp_path / "out" / "predictions.json"
    completed = run_cli(f"--model_dir={model_dir}", "--top_k=2", "--batch_size=4", f"--output={output}", str(images))
    assert completed.returncode == 1, completed.stderr
    assert error_lines(completed.stderr) == [f"error: {path}: not a decodable image" for path in bad]
    assert completed.stdout == f"wrote 4 predictions to {output}\n"
    written = json.loads(output.read_text())
    assert [item["path"] for item in written] == good
    for item in written:
        check_sorted_top_k(item, top_k=2)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model_dir={model_dir}", "--output=predictions.txt", "{image}"], "--output 'predictions.txt' must end in"),
        (["{image}"], "--model_dir is required"),
    ],
    ids=["bad_output_extension", "missing_model_dir"],
)
def test_cli_usage_errors_exit_2_with_one_line(model_dir, tmp_path, arguments, message):
    # Each CLI run costs seconds of TensorFlow start-up: other usage errors (a path that matches nothing,
    # --top_k 0) go through the same ValueError -> exit 2 path and are tested on the functions.
    (image,) = write_images(tmp_path, ["a.png"])
    values = {"model_dir": model_dir, "image": image}
    completed = run_cli(*(argument.format(**values) for argument in arguments))
    assert completed.returncode == 2, completed.stderr
    (line,) = error_lines(completed.stderr)
    assert message in line
    assert completed.stderr.strip().splitlines()[-1] == line
    assert completed.stdout == ""


def write_file(path: str, results: list[dict]) -> None:
    with output_files.PredictionFile(path) as output:
        output.write(results)


def test_csv_and_json_outputs_hold_sorted_top_k(serve, tmp_path):
    paths = write_images(tmp_path, ["a.png", "b.jpg", "c.png"])
    results, _ = prediction.predict_files(serve=serve, paths=paths, class_names=CLASS_NAMES, top_k=3, batch_size=8)

    write_file(str(tmp_path / "predictions.csv"), results)
    with open(tmp_path / "predictions.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert list(rows[0]) == [
        "path", "class_name", "probability", "top1_class_name", "top1_probability", "top2_class_name",
        "top2_probability", "top3_class_name", "top3_probability",
    ]
    assert [row["path"] for row in rows] == paths
    for row, result in zip(rows, results):
        top = [{"class_name": row[f"top{rank}_class_name"], "probability": float(row[f"top{rank}_probability"])}
               for rank in (1, 2, 3)]
        check_sorted_top_k({"class_name": row["class_name"], "probability": float(row["probability"]), "top_k": top}, 3)
        assert row["class_name"] == result["class_name"]

    write_file(str(tmp_path / "predictions.json"), results)
    written = json.loads((tmp_path / "predictions.json").read_text())
    assert [item["path"] for item in written] == paths
    for item, result in zip(written, results):
        check_sorted_top_k(item, top_k=3)
        assert item["probability"] == pytest.approx(result["probability"], abs=1e-6)
    assert sorted(path.name for path in tmp_path.iterdir() if "predictions" in path.name) == [
        "predictions.csv", "predictions.json",  # no temporary file left behind
    ]

    with pytest.raises(ValueError, match="must end in .csv or .json"):
        output_files.PredictionFile(str(tmp_path / "predictions.tsv"))

    stream = io.StringIO()
    table = output_files.PredictionTable(stream=stream, paths=paths, class_names=CLASS_NAMES)
    table.write([])
    assert stream.getvalue() == ""  # no results, no header
    table.write(results[:1])
    table.write(results[1:])
    lines = stream.getvalue().splitlines()
    assert lines[0].split() == ["path", "class_name", "probability", "top_k"]
    assert [line.split()[:3] for line in lines[1:]] == [
        [result["path"], result["class_name"], f"{result['probability']:.4f}"] for result in results
    ]
    assert all(line.count(",") == 2 for line in lines[1:])  # three "name probability" pairs
    # Widths fixed up front line up the columns of every batch.
    assert len({line.index(" class_name ") if number == 0 else line.index(" " + result["class_name"] + " ")
                for number, (line, result) in enumerate(zip(lines, [None, *results]))}) == 1


ODD_TEXT = ["cr\rret", "new\nline", "crlf\r\nend", "comma, here", 'quote " here', "line\u2028separator",
            "tab\there", " spaced ", ""]


def test_csv_quotes_every_field_a_reader_would_split(tmp_path):
    # Before: csv.writer(lineterminator="\n") left a "\r" unquoted, so csv.reader read 'cr\rret.jpg' as two rows.
    results = [
        {"path": f"{text}.jpg", "class_name": text or "empty", "probability": 0.5,
         "top_k": [{"class_name": text or "empty", "probability": 0.5}, {"class_name": "x\ry", "probability": 0.25}]}
        for text in ODD_TEXT
    ]
    path = tmp_path / "odd.csv"
    write_file(str(path), results)
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    assert rows[1:] == [[result["path"], result["class_name"], "0.500000", result["class_name"], "0.500000", "x\ry",
                         "0.250000"] for result in results]
    assert path.read_bytes().endswith(b"0.250000\n")  # rows still end in "\n"


def test_the_table_shows_control_characters_escaped_one_row_per_image():
    # Before: a path holding "\n" or "\r" broke its row in two on the terminal.
    results = [{"path": f"{text}.jpg", "class_name": "new\nname", "probability": 0.5,
                "top_k": [{"class_name": "new\nname", "probability": 0.5}]} for text in ODD_TEXT]
    stream = io.StringIO()
    table = output_files.PredictionTable(stream=stream, paths=[result["path"] for result in results],
                                       class_names=["new\nname"])
    table.write(results)
    lines = stream.getvalue().split("\n")
    assert lines[-1] == "" and len(lines[:-1]) == 1 + len(results)
    assert not any(character in stream.getvalue() for character in "\r\t\u2028")
    assert lines[1].startswith("cr\\rret.jpg ") and lines[3].startswith("crlf\\r\\nend.jpg ")
    assert lines[6].startswith("line\\u2028separator.jpg ") and "new\\nname 0.5000" in lines[1]
    assert lines[5].startswith('quote " here.jpg ')  # printable characters are shown as they are
    assert len({line.index("0.5000") for line in lines[1:-1]}) == 1  # the widths count the escaped text


def test_ram_filesystem_for_images_and_output(serve):
    root = f"ram://predict-{uuid.uuid4().hex}"
    tf.io.gfile.makedirs(f"{root}/images/nested")
    for name, encoded in [("a.png", encode(0)), ("nested/b.jpg", encode(1, "JPEG")), (".hidden.png", encode(2))]:
        with tf.io.gfile.GFile(f"{root}/images/{name}", "wb") as file:
            file.write(encoded)
    paths = listing.list_images([f"{root}/images"])
    assert paths == [f"{root}/images/a.png", f"{root}/images/nested/b.jpg"]
    results, failures = prediction.predict_files(serve=serve, paths=paths, class_names=CLASS_NAMES, top_k=2, batch_size=2)
    assert failures == {} and len(results) == 2
    write_file(f"{root}/out/predictions.json", results)
    with tf.io.gfile.GFile(f"{root}/out/predictions.json", "r") as file:
        assert [item["path"] for item in json.load(file)] == paths
    assert tf.io.gfile.listdir(f"{root}/out") == ["predictions.json"]


# --- Streaming: each batch written before the next one is labelled ---------------------------------------

def reference_csv(results: list[dict]) -> str:
    """The CSV the whole-list writer (before streaming) made: the streamed file must be the same, byte for byte."""
    depth = max((len(result["top_k"]) for result in results), default=0)
    header = ["path", "class_name", "probability"]
    for rank in range(1, depth + 1):
        header += [f"top{rank}_class_name", f"top{rank}_probability"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for result in results:
        row = [result["path"], result["class_name"], f"{result['probability']:.6f}"]
        for entry in result["top_k"]:
            row += [entry["class_name"], f"{entry['probability']:.6f}"]
        writer.writerow(row)
    return text.getvalue()


def reference_json(results: list[dict]) -> str:
    """The JSON the whole-list writer (before streaming) made."""
    rounded = [
        {"path": result["path"], "class_name": result["class_name"], "probability": round(result["probability"], 6),
         "top_k": [{"class_name": entry["class_name"], "probability": round(entry["probability"], 6)}
                   for entry in result["top_k"]]}
        for result in results
    ]
    return json.dumps(rounded, indent=2) + "\n"


def reference_table(results: list[dict]) -> str:
    """The table the whole-list printer (before streaming) made, its widths computed from all the rows."""
    if not results:
        return ""
    rows = [["path", "class_name", "probability", "top_k"]]
    for result in results:
        top = ", ".join(f"{entry['class_name']} {entry['probability']:.4f}" for entry in result["top_k"])
        rows.append([result["path"], result["class_name"], f"{result['probability']:.4f}", top])
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = ["  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[3]]) for row in rows]
    return "\n".join(lines) + "\n"


def stream_to_file(*, serve, paths: list[str], output: str, top_k: int, batch_size: int) -> tuple[int, dict]:
    """What `python -m trainer.predict --output=...` runs."""
    batches = prediction.predict_batches(
        serve=serve, paths=paths, class_names=CLASS_NAMES, top_k=top_k, batch_size=batch_size, num_read_threads=2
    )
    with output_files.PredictionFile(output) as opened:
        return prediction.write_batches(batches=batches, output=opened)


@pytest.mark.parametrize("top_k, batch_size", [(2, 2), (10, 3)])
def test_streamed_files_are_byte_identical_to_the_whole_list_format(serve, tmp_path, top_k, batch_size):
    # A corrupt file in the middle, a batch of nothing but corrupt files, a path that CSV must quote.
    images = tmp_path / "images"
    write_images(images, ["a.png", "b.jpg", "e, quoted.png", "f.png", "g.jpg", "h.png", "i.png"])
    for name in ("c.jpg", "d.png", "d2.png"):
        (images / name).write_bytes(b"not an image")
    paths = listing.list_images([str(images)])
    results, failures = prediction.predict_files(
        serve=serve, paths=paths, class_names=CLASS_NAMES, top_k=top_k, batch_size=batch_size
    )
    assert len(results) == 7 and len(failures) == 3
    for name, reference in [("out.csv", reference_csv), ("out.json", reference_json)]:
        num_labelled, streamed_failures = stream_to_file(
            serve=serve, paths=paths, output=str(tmp_path / name), top_k=top_k, batch_size=batch_size
        )
        assert (num_labelled, streamed_failures) == (len(results), failures)
        assert (tmp_path / name).read_bytes() == reference(results).encode("utf-8"), name
        assert not list(tmp_path.glob("*.incomplete"))
    # With no failed file, the table's widths fixed up front are the ones the whole table had.
    good = [result["path"] for result in results]
    stream = io.StringIO()
    prediction.write_batches(
        batches=prediction.predict_batches(serve=serve, paths=good, class_names=CLASS_NAMES, top_k=top_k,
                                           batch_size=batch_size),
        output=output_files.PredictionTable(stream=stream, paths=good, class_names=CLASS_NAMES),
    )
    assert stream.getvalue() == reference_table(results)


def test_streamed_files_without_any_result_are_the_empty_formats(serve, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    paths = [str(tmp_path / "broken.jpg")]
    for name, reference in [("out.csv", "path,class_name,probability\n"), ("out.json", "[]\n")]:
        assert reference == (reference_csv([]) if name.endswith(".csv") else reference_json([]))
        num_labelled, failures = stream_to_file(serve=serve, paths=paths, output=str(tmp_path / name), top_k=2,
                                                batch_size=4)
        assert (num_labelled, failures) == (0, {paths[0]: "not a decodable image"})
        assert (tmp_path / name).read_text() == reference


@pytest.mark.parametrize("name", ["predictions.csv", "predictions.json"])
def test_each_batch_is_in_the_incomplete_file_before_the_next_is_labelled(serve, tmp_path, name):
    paths = write_images(tmp_path / "images", [f"image{index}.png" for index in range(7)])
    output = tmp_path / "out" / name
    seen_before_call = []

    def watched_serve(image_bytes):
        # The real model, called as predict calls it; before each call, what the output file holds so far.
        incomplete = list((tmp_path / "out").glob(name + ".*.incomplete")) if (tmp_path / "out").exists() else []
        assert len(incomplete) <= 1
        seen_before_call.append(incomplete[0].read_text() if incomplete else None)
        return serve(image_bytes=image_bytes)

    stream_to_file(serve=watched_serve, paths=paths, output=str(output), top_k=2, batch_size=3)
    assert len(seen_before_call) == 3  # batches of 3, 3 and 1 files
    final = output.read_text()
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [name]
    assert seen_before_call[0] in (None, "")
    if name.endswith(".csv"):
        lines = final.splitlines(keepends=True)
        assert seen_before_call[1:] == ["".join(lines[:4]), "".join(lines[:7])]  # header + 3 rows, + 3 rows
    else:
        for held, num_items in zip(seen_before_call[1:], (3, 6)):
            # A prefix of the final file that is the list of the batches so far, once closed.
            assert final.startswith(held)
            assert [item["path"] for item in json.loads(held + "\n]\n")] == paths[:num_items]


def test_a_run_that_stops_with_an_error_leaves_neither_output_nor_incomplete_file(serve, tmp_path):
    # Before: the rows labelled so far stayed in <output>.incomplete (only a killed process may leave it now).
    paths = write_images(tmp_path / "images", [f"image{index}.png" for index in range(7)])
    calls = []

    def failing_serve(image_bytes):
        calls.append(len(image_bytes))
        if len(calls) == 3:
            raise RuntimeError("the machine went away")
        return serve(image_bytes=image_bytes)

    output = tmp_path / "out" / "nested" / "predictions.csv"
    with pytest.raises(RuntimeError, match="went away"):
        stream_to_file(serve=failing_serve, paths=paths, output=str(output), top_k=2, batch_size=3)
    assert len(calls) == 3  # two batches were written to the .incomplete file before the error
    assert not (tmp_path / "out").exists()  # nor the folders it made for the output
    # An error before any row (the labels of another model) leaves no file at all.
    other_output = tmp_path / "other" / "predictions.json"
    batches = prediction.predict_batches(serve=serve, paths=paths, class_names=["a", "b"], top_k=1, batch_size=3)
    with pytest.raises(ValueError, match="lists 2 class names"), output_files.PredictionFile(str(other_output)) as opened:
        prediction.write_batches(batches=batches, output=opened)
    assert not (tmp_path / "other").exists()
    # An output that cannot take the finished file (here a folder of that name) keeps what is there.
    (tmp_path / "taken.csv").mkdir()
    (tmp_path / "taken.csv" / "kept.txt").write_text("kept")
    with pytest.raises(ValueError, match="exists now but did not when this run started"):
        stream_to_file(serve=serve, paths=paths, output=str(tmp_path / "taken.csv"), top_k=2, batch_size=3)
    with pytest.raises(IsADirectoryError), output_files.PredictionFile(str(tmp_path / "taken.csv"),
                                                                     overwrite=True) as opened:
        opened.write([{"path": "a.png", "class_name": "cat", "probability": 1.0, "top_k": []}])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images", "taken.csv"]
    assert (tmp_path / "taken.csv" / "kept.txt").read_text() == "kept"


def result_rows(name: str) -> list[dict]:
    return [{"path": name, "class_name": "cat", "probability": 1.0, "top_k": [{"class_name": "cat", "probability": 1.0}]}]


@pytest.mark.parametrize("name", ["predictions.csv", "predictions.json"])
def test_two_runs_on_one_output_never_share_a_file_and_the_second_replaces_only_with_overwrite(tmp_path, name):
    # Before: both wrote <output>.incomplete at once (NUL bytes in the output) and the second reported success.
    output = str(tmp_path / name)
    first, second = output_files.PredictionFile(output), output_files.PredictionFile(output)
    first.write(result_rows("first.png"))
    second.write(result_rows("second.png"))
    first.write(result_rows("first2.png"))
    assert first.temporary_path != second.temporary_path
    assert len(list(tmp_path.glob(name + ".*.incomplete"))) == 2
    # The first to finish makes the output; the second, started before it existed, may not replace it.
    first.__exit__(None, None, None)
    written_first = Path(output).read_bytes()
    with pytest.raises(ValueError, match="exists now but did not when this run started.*--overwrite"):
        second.__exit__(None, None, None)
    assert Path(output).read_bytes() == written_first
    assert b"second.png" not in written_first and b"\0" not in written_first
    assert os.listdir(tmp_path) == [name]
    with output_files.PredictionFile(output, overwrite=True) as third:
        third.write(result_rows("third.png"))
    assert b"third.png" in Path(output).read_bytes() and os.listdir(tmp_path) == [name]


def test_the_temporary_file_is_never_written_through_a_link_already_there(model_dir, tmp_path):
    # Before: a link named <output>.incomplete (here into the model_dir) was followed, and its target overwritten.
    run = copy_run(model_dir, tmp_path / "model")
    (run / "run.json").write_text("the run's record")
    output = tmp_path / "predictions.csv"
    (tmp_path / "predictions.csv.incomplete").symlink_to(run / "run.json")
    write_file(str(output), result_rows("a.png"))
    assert (run / "run.json").read_text() == "the run's record"
    assert output.read_text().startswith("path,class_name,probability")
    assert sorted(os.listdir(tmp_path)) == ["model", "predictions.csv", "predictions.csv.incomplete"]
    assert oct(output.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# --- --output never replaces what it must not: the run's files, the images, a file without --overwrite -----

def test_cli_refuses_an_existing_output_untouched_and_replaces_it_with_overwrite(model_dir, tmp_path):
    # Before: any existing .csv/.json was overwritten without a word.
    (image,) = write_images(tmp_path / "images", ["a.png"])
    output = tmp_path / "predictions.csv"
    output.write_bytes(b"somebody's spreadsheet\r\n")
    completed = run_cli(f"--model_dir={model_dir}", f"--output={output}", image)
    assert completed.returncode == 2, completed.stderr
    (line,) = error_lines(completed.stderr)
    assert "already exists" in line and "--overwrite" in line
    assert output.read_bytes() == b"somebody's spreadsheet\r\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images", "predictions.csv"]
    completed = run_cli(f"--model_dir={model_dir}", f"--output={output}", "--overwrite", image)
    assert completed.returncode == 0, completed.stderr
    assert [row["path"] for row in csv.DictReader(io.StringIO(output.read_text()))] == [image]


def test_cli_never_writes_into_the_model_dir_even_with_overwrite(model_dir, tmp_path):
    # Before: --output=<model_dir>/run.json replaced the run's own record.
    run = copy_run(model_dir, tmp_path / "model")
    (run / "run.json").write_bytes(b'{"classes": ["cat", "dog", "fox", "owl"]}\n')
    (image,) = write_images(tmp_path / "images", ["a.png"])
    completed = run_cli(f"--model_dir={run}", f"--output={run / 'run.json'}", "--overwrite", image)
    assert completed.returncode == 2, completed.stderr
    (line,) = error_lines(completed.stderr)
    assert "inside --model_dir" in line
    assert (run / "run.json").read_bytes() == b'{"classes": ["cat", "dog", "fox", "owl"]}\n'
    assert not (run / "run.json.incomplete").exists()


def test_cli_output_that_is_a_folder_is_one_line_before_any_work_and_leaves_nothing(model_dir, tmp_path):
    # Before: a traceback at the end of the run, and a stray dir.csv.incomplete holding every row.
    (image,) = write_images(tmp_path / "images", ["a.png"])
    (tmp_path / "dir.csv").mkdir()
    completed = run_cli(f"--model_dir={model_dir}", f"--output={tmp_path / 'dir.csv'}", image)
    assert completed.returncode == 2, completed.stderr
    (line,) = error_lines(completed.stderr)
    assert "is a folder" in line and "Traceback" not in completed.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dir.csv", "images"]
    assert not list((tmp_path / "dir.csv").iterdir())


@pytest.mark.parametrize("output, inputs, overwrite, message", [
    ("images/predictions.csv", ["images"], False, "inside 'images', a folder being labelled"),
    ("images/nested/predictions.json", ["images/"], True, "inside 'images/', a folder being labelled"),
    ("images/predictions.csv", ["images/*"], False, "matches 'images/*', which is being labelled"),
    ("images/nested/predictions.csv", ["image*"], False, "is inside './images', a folder being labelled"),
    ("images/listed.csv", ["images/listed.csv"], True, "is 'images/listed.csv', a file being labelled"),
    ("model/predictions.csv", ["images"], False, "inside --model_dir"),
    ("model/run.json", ["images"], True, "inside --model_dir"),
    ("existing.csv", ["images"], False, "already exists; pass --overwrite"),
    ("folder.json", ["images"], True, "is a folder"),
    ("existing.csv/predictions.csv", ["images"], False, "is a file, not a folder"),
    ("predictions.txt", ["images"], False, "must end in .csv or .json"),
], ids=["in_folder", "nested_in_folder", "glob_match", "inside_glob_match", "a_labelled_file", "model_dir",
        "model_dir_overwrite", "exists", "folder", "parent_is_a_file", "extension"])
def test_output_paths_that_would_replace_something_are_refused(tmp_path, monkeypatch, output, inputs, overwrite,
                                                               message):
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "images", ["a.png", "nested/b.png"])
    (tmp_path / "images" / "listed.csv").write_text("an image with a misleading name")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "run.json").write_text("{}")
    (tmp_path / "existing.csv").write_text("x")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(ValueError, match=re.escape(message)):
        output_files.check_output_path(output, overwrite=overwrite, model_dir="model",
                                     listed=listing.list_inputs(inputs))


@pytest.mark.parametrize("output, inputs, overwrite", [
    ("predictions.csv", ["images/a.png"], False),  # beside a file being labelled (photo.jpg in the same folder)
    ("predictions.csv", ["images/*.png"], False),
    ("existing.csv", ["images"], True),
    ("new/folder/predictions.json", ["images", "elsewhere/*"], False),
    ("photos[2024].csv", ["photos[2024]"], False),  # beside the folder of that name
])
def test_output_paths_that_replace_nothing_are_accepted(tmp_path, monkeypatch, output, inputs, overwrite):
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "images", ["a.png"])
    write_images(tmp_path / "elsewhere", ["b.png"])
    write_images(tmp_path / "photos[2024]", ["c.png"])
    (tmp_path / "model").mkdir()
    (tmp_path / "existing.csv").write_text("x")
    output_files.check_output_path(output, overwrite=overwrite, model_dir="model", listed=listing.list_inputs(inputs))


def test_an_argument_is_refused_as_it_is_listed_a_folder_with_glob_characters_too(tmp_path, monkeypatch):
    # Before: 'photos[2024]' was listed as the folder of that name but compared as a glob (matching 'photos2'), so
    # --output='photos[2024]/notes.csv' --overwrite labelled notes.csv and then replaced it.
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "photos[2024]", ["a.png"])
    (tmp_path / "photos[2024]" / "notes.csv").write_text("my notes")
    listed = listing.list_inputs(["photos[2024]"])
    assert listed.files == ["photos[2024]/a.png", "photos[2024]/notes.csv"] and listed.globs == []
    for output in ("photos[2024]/notes.csv", "photos[2024]/new.csv"):
        with pytest.raises(ValueError, match=re.escape("is inside 'photos[2024]', a folder being labelled")):
            output_files.check_output_path(output, overwrite=True, model_dir="model", listed=listed)
    # Read as a glob when no file or folder has that name: 'photos[2024]' then matches 'photos2'.
    write_images(tmp_path / "photos2", ["b.png"])
    listed = listing.list_inputs(["photo[s]2"])
    assert listed.globs == ["photo[s]2"] and listed.files == ["./photos2/b.png"]  # as tf.io.gfile.glob gives it
    with pytest.raises(ValueError, match=re.escape("is inside './photos2', a folder being labelled")):
        output_files.check_output_path("photos2/new.csv", overwrite=True, model_dir="model", listed=listed)


def test_an_output_reached_through_a_link_in_a_labelled_folder_is_refused(tmp_path, monkeypatch):
    # Before: images2/link -> other: other/old.csv was labelled through the link, then replaced by --overwrite.
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "images2", ["a.png"])
    write_images(tmp_path / "other", ["b.png"])
    (tmp_path / "other" / "old.csv").write_text("kept")
    (tmp_path / "images2" / "link").symlink_to(tmp_path / "other")
    (tmp_path / "loose.png").symlink_to(tmp_path / "old.json")  # a file link to the output's path
    (tmp_path / "old.json").write_text("[]")
    listed = listing.list_inputs(["images2", "loose.png"])
    for output, message in [("other/old.csv", "is inside 'images2/link', a folder being labelled"),
                            ("other/new.json", "is inside 'images2/link', a folder being labelled"),
                            ("old.json", "is 'loose.png', a file being labelled")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            output_files.check_output_path(output, overwrite=True, model_dir="model", listed=listed)


def test_a_link_loop_lists_each_real_folder_once_with_a_warning(tmp_path):
    # Before: `ln -s .. in2/loop/up` listed every file ~40 times, then failed (too many levels of links).
    write_images(tmp_path / "in2", ["a.png", "loop/b.png"])
    (tmp_path / "in2" / "loop" / "up").symlink_to("..")
    (tmp_path / "in2" / "zagain").symlink_to(tmp_path / "in2" / "loop")
    listed = listing.list_inputs([str(tmp_path / "in2"), str(tmp_path / "in2" / "loop")])
    assert listed.files == [str(tmp_path / "in2" / "a.png"), str(tmp_path / "in2" / "loop" / "b.png")]
    assert sorted(listed.warnings) == [
        f"{tmp_path}/in2/loop/up: skipped, a link to {tmp_path}/in2, a folder already listed",
        f"{tmp_path}/in2/zagain: skipped, a link to {tmp_path}/in2/loop, a folder already listed",
    ]
    assert listed.skipped == {}


def test_a_name_that_is_not_utf8_is_one_reported_file_and_the_others_are_labelled(tmp_path):
    # Before: one such name stopped the whole run ("'utf-8' codec can't decode byte 0xff").
    write_images(tmp_path / "images", ["a.png", "b.png"])
    bad = os.fsdecode(os.fsencode(str(tmp_path / "images")) + b"/\xffbad.png")
    Path(bad).write_bytes(encode(0))
    listed = listing.list_inputs([str(tmp_path / "images"), bad])
    assert listed.files == [str(tmp_path / "images" / "a.png"), str(tmp_path / "images" / "b.png")]
    assert listed.skipped == {bad: listing.NOT_UTF8_REASON}  # walked and given: one entry
    assert listing.printable(bad) == f"{tmp_path}/images/\\xffbad.png"
    assert listing.argument_kind(bad) == listing.NOT_UTF8
    (tmp_path / "only_bad").mkdir()
    os.rename(bad, os.fsdecode(os.fsencode(str(tmp_path / "only_bad")) + b"/\xff.png"))
    listed = listing.list_inputs([str(tmp_path / "only_bad")])  # not "has no files": its file is reported
    assert listed.files == [] and list(listed.skipped.values()) == [listing.NOT_UTF8_REASON]


def test_memory_does_not_grow_with_the_number_of_files(serve, tmp_path):
    # Before streaming, every result (~1 kB) and then the whole output text were held until the end.
    encoded = encode(0, size=(8, 8))
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(1600):
        (folder / f"{index:05d}.png").write_bytes(encoded)
    all_paths = listing.list_images([str(folder)])

    def peak_bytes(paths: list[str], output: str) -> int:
        tracemalloc.start()
        try:
            stream_to_file(serve=serve, paths=paths, output=output, top_k=3, batch_size=32)
            with open(os.devnull, "w") as devnull:
                prediction.write_batches(
                    batches=prediction.predict_batches(serve=serve, paths=paths, class_names=CLASS_NAMES, top_k=3,
                                                       batch_size=32),
                    output=output_files.PredictionTable(stream=devnull, paths=paths, class_names=CLASS_NAMES),
                )
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak_bytes(all_paths[:64], str(tmp_path / "warm_up.json"))  # the model's first calls allocate once
    small = peak_bytes(all_paths[:200], str(tmp_path / "small.json"))
    large = peak_bytes(all_paths, str(tmp_path / "large.json"))
    assert len(json.loads((tmp_path / "large.json").read_text())) == 1600
    # 1,400 more files: well under 100 bytes each (the results alone took ~1 kB each before).
    assert large - small < 1400 * 100, (small, large)


def test_an_unknown_format_or_a_missing_export_is_a_clear_error(model_dir):
    with pytest.raises(ValueError, match="--format='pt' is not one of"):
        prediction.load_serving(model_dir=str(model_dir), class_names=CLASS_NAMES, model_format="pt")
    with pytest.raises(ValueError, match="no TFLite model at"):
        prediction.load_serving(model_dir=str(model_dir), class_names=CLASS_NAMES, model_format="tflite")


# --- Every format checks the class names it prints against the model it runs ------------------------------

@pytest.mark.parametrize("model_format", EXPORT_FORMATS)
def test_every_format_checks_every_class_name_it_prints(exports_dir, tmp_path, model_format):
    # Before: only the top class's name was compared (and for ONNX none): two swapped runner-up classes
    # printed each other's probabilities under the wrong names.
    paths = write_images(tmp_path, ["a.png", "b.jpg"])
    serve = prediction.load_serving(model_dir=str(exports_dir), class_names=test_export.CLASS_NAMES,
                                    model_format=model_format)
    names = test_export.CLASS_NAMES
    results, _ = prediction.predict_files(serve=serve, paths=paths, class_names=names, top_k=3, batch_size=2)
    top = {result["class_name"] for result in results}
    assert len(top) == 1, "the test needs one top class for both images"
    first, second = [name for name in names if name not in top]
    swapped = [{first: second, second: first}.get(name, name) for name in names]
    with pytest.raises(ValueError, match=rf"labels.txt calls class \d '.*' but {NAMES_SOURCES[model_format]} calls"):
        prediction.predict_files(serve=serve, paths=paths, class_names=swapped, top_k=3, batch_size=2)


@pytest.mark.parametrize("model_format", [name for name in EXPORT_FORMATS if name != "saved_model"])
def test_cli_refuses_labels_that_disagree_with_the_export_it_runs(exports_dir, tmp_path, model_format):
    # Before: --format=onnx printed the reordered names with exit 0 (even with saved_model/ removed), and a
    # reordered tflite/labels.txt was reported as a SavedModel mismatch.
    model_dir = copy_run(exports_dir, tmp_path / "model")
    shutil.rmtree(model_dir / export.SAVED_MODEL_DIR)
    names = test_export.CLASS_NAMES
    renamed = names[1:] + names[:1]  # every class renamed
    write_labels(model_dir / export.TFLITE_DIR if model_format == "tflite" else model_dir, renamed)
    (image,) = write_images(tmp_path, ["a.png"])
    completed = run_cli(f"--model_dir={model_dir}", f"--format={model_format}", image)
    assert completed.returncode == 2, completed.stderr
    (line,) = error_lines(completed.stderr)
    assert re.search(rf"labels.txt calls class \d '.*' but {NAMES_SOURCES[model_format]} calls it", line), line
    assert completed.stdout == ""


def test_every_class_name_is_checked_though_the_signature_names_only_its_top_k(top_1_model_dir, tmp_path):
    # Before: with `train --top_k=1` the signature names only the best class, so a labels.txt with two runner-up
    # classes swapped printed them under each other's names (exit 0). The SavedModel's full list is compared now.
    assert export.read_saved_model_class_names(str(top_1_model_dir / export.SAVED_MODEL_DIR)) == CLASS_NAMES
    run = copy_run(top_1_model_dir, tmp_path / "model")
    swapped = [CLASS_NAMES[0], CLASS_NAMES[2], CLASS_NAMES[1], CLASS_NAMES[3]]
    write_labels(run, swapped)
    with pytest.raises(ValueError, match=r"labels.txt calls class 1 'fox' but the SavedModel calls it 'dog'"):
        prediction.load_serving(model_dir=str(run), class_names=prediction.read_class_names(str(run)))
    with pytest.raises(ValueError, match=r"labels.txt lists 3 class names but the SavedModel has 4"):
        prediction.load_serving(model_dir=str(run), class_names=CLASS_NAMES[:3])
    prediction.load_serving(model_dir=str(top_1_model_dir), class_names=CLASS_NAMES)  # its own names pass


@pytest.mark.parametrize("model_format", [name for name in EXPORT_FORMATS if name != "saved_model"])
def test_labels_reordered_alike_beside_every_export_are_refused(exports_dir, tmp_path, model_format):
    # Before: labels.txt and tflite/labels.txt reordered the same way printed swapped names (exit 0): the .tflite
    # file carries no names. Both are checked against the SavedModel's own list now; ONNX against its own names.
    run = copy_run(exports_dir, tmp_path / "model")
    names = test_export.CLASS_NAMES
    reordered = names[1:] + names[:1]
    write_labels(run, reordered)
    write_labels(run / export.TFLITE_DIR, reordered)
    source = "the SavedModel" if model_format == "tflite" else "model.onnx"
    with pytest.raises(ValueError, match=rf"labels.txt calls class 0 '{reordered[0]}' but {source} calls it"):
        prediction.load_serving(model_dir=str(run), class_names=reordered, model_format=model_format)
    if model_format == "tflite":
        shutil.rmtree(run / export.SAVED_MODEL_DIR)  # nothing left to check the two labels files against
        with pytest.raises(ValueError, match=r"no SavedModel with its class names in .*run's own class names"):
            prediction.load_serving(model_dir=str(run), class_names=reordered, model_format=model_format)


def test_a_truncated_tflite_labels_file_is_one_error(exports_dir, tmp_path):
    # Before: an IndexError traceback from the first batch.
    run = copy_run(exports_dir, tmp_path / "model")
    write_labels(run / export.TFLITE_DIR, test_export.CLASS_NAMES[:2])
    with pytest.raises(ValueError, match=r"labels.txt lists 3 class names but tflite/labels.txt has 2"):
        prediction.load_serving(model_dir=str(run), class_names=test_export.CLASS_NAMES, model_format="tflite")


@pytest.mark.skipif(not ONNX_INSTALLED, reason="the onnx extra is not installed (pip install '.[onnx]')")
def test_an_onnx_file_without_class_names_is_refused_with_how_to_re_export(exports_dir, tmp_path):
    import onnx

    model_dir = copy_run(exports_dir, tmp_path / "model")
    graph = onnx.load(str(model_dir / "model.onnx"))
    del graph.metadata_props[:]  # as model.onnx was written before it carried the class names
    onnx.save(graph, str(model_dir / "model.onnx"))
    with pytest.raises(ValueError, match=r"model.onnx' carries no class names.*--export_onnx"):
        prediction.load_serving(model_dir=str(model_dir), class_names=test_export.CLASS_NAMES, model_format="onnx")


def test_a_missing_export_names_the_training_flag_that_writes_it(exports_dir, tmp_path):
    model_dir = copy_run(exports_dir, tmp_path / "model")
    with pytest.raises(ValueError, match=r"no TFLite model at .*model_int8.tflite'; train with --export_tflite=int8"):
        prediction.load_serving(model_dir=str(model_dir), class_names=test_export.CLASS_NAMES, model_format="tflite",
                                tflite_kind="int8")
    (model_dir / export.TFLITE_DIR / prediction.LABELS_FILE).unlink()
    with pytest.raises(ValueError, match=r"no labels.txt beside .*model.tflite'"):
        prediction.load_serving(model_dir=str(model_dir), class_names=test_export.CLASS_NAMES, model_format="tflite")


# --- One decode-and-normalise path: a file is labelled as the converter stores it for training ---------------

def transparent_png(hidden=(200, 30, 60)) -> bytes:
    """A photo-like image whose right quarter is transparent over `hidden` (which the converter makes white), with a
    half-transparent strip beside it."""
    rgb = np.asarray(Image.open(io.BytesIO(test_export.encode(3, "PNG", size=(40, 48), smooth=True))))
    rgba = np.dstack([rgb, np.full((40, 48), 255, np.uint8)])
    rgba[:, 30:36, 3] = 128
    rgba[:, 36:] = (*hidden, 0)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("model_format", EXPORT_FORMATS)
def test_a_transparent_png_gets_its_converted_copys_input_in_every_format(exports_dir, tmp_path, model_format):
    # Before: the converter put transparent pixels on white for training, predict showed the colour hidden under
    # them. Now predict prepares a file as the converter stores it: the same bytes reach the model, so a PNG and
    # its converted copy (what training and evaluation read) get the same probabilities, exactly.
    from tfrecords.writing import images

    png = transparent_png()
    (tmp_path / "transparent.png").write_bytes(png)
    (tmp_path / "converted.jpg").write_bytes(images.load_image(png)[0])
    (tmp_path / "shown.png").write_bytes(encode_opaque(png))  # the hidden colour shown: the model must see it
    serve = prediction.load_serving(model_dir=str(exports_dir), class_names=test_export.CLASS_NAMES,
                                    model_format=model_format)
    paths = [str(tmp_path / name) for name in ("transparent.png", "converted.jpg", "shown.png")]
    results, failures = prediction.predict_files(serve=serve, paths=paths, class_names=test_export.CLASS_NAMES,
                                                 top_k=3, batch_size=3)
    assert failures == {}
    transparent, converted, shown = [
        [{entry["class_name"]: entry["probability"] for entry in result["top_k"]}[name] for name in test_export.CLASS_NAMES]
        for result in results
    ]
    np.testing.assert_allclose(transparent, converted, atol=1e-6)
    assert np.abs(np.array(shown) - converted).max() > 0.1  # the test model does look at those pixels


def test_a_server_given_the_transparent_png_itself_sees_it_on_white_too(exports_dir):
    # A client of the SavedModel (TensorFlow Serving, Vertex AI) sends the file as it is: the signature's own
    # decode puts transparent pixels on white with the converter's formula, so only JPEG rounding differs.
    from tfrecords.writing import images

    png = transparent_png()
    serve = export.load_serving_function(str(exports_dir / export.SAVED_MODEL_DIR))
    files = [png, images.load_image(png)[0], encode_opaque(png)]
    as_file, converted, shown = serve(image_bytes=tf.constant(files))["probabilities"].numpy()
    assert np.abs(as_file - converted).max() < 0.02
    assert np.abs(shown - converted).max() > 0.1


def encode_opaque(png: bytes) -> bytes:
    rgba = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA")).copy()
    rgba[..., 3] = 255
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def write_broken_images(folder: Path) -> list[str]:
    """Files TensorFlow's decoders log about (libjpeg straight to stderr) besides failing."""
    jpeg = encode(0, "JPEG", size=(60, 50))
    start_of_scan = jpeg.index(b"\xff\xda")
    contents = {
        "header_only.jpg": jpeg[:start_of_scan],  # libjpeg: "Input file read error"
        "start_marker_only.jpg": b"\xff\xd8\xff",  # libjpeg: "Improper call to JPEG library in state 201"
        "cut_in_half.jpg": jpeg[: len(jpeg) // 2],  # TensorFlow: "Premature end of JPEG data"
        "cut_in_half.png": encode(1, "PNG")[:300],
        "text.png": b"not an image",
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in contents.items():
        (folder / name).write_bytes(content)
    return sorted(str(folder / name) for name in contents)


@pytest.mark.parametrize("model_format", EXPORT_FORMATS)
def test_each_broken_file_is_one_line_on_stderr_without_decoder_noise(exports_dir, tmp_path, model_format):
    # Before: each broken file also printed libjpeg's and TensorFlow's own lines ("Input file read error",
    # "Improper call to JPEG library", "Local rendezvous is aborting", ...), some twice (batch, then file).
    images_folder = tmp_path / "images"
    good = write_images(images_folder, ["good.png", "good.jpg"])
    broken = write_broken_images(images_folder)
    # As a user runs it: without the TF_CPP_MIN_LOG_LEVEL the test session sets.
    environment = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    completed = subprocess.run(
        [sys.executable, "-m", "trainer.predict", f"--model_dir={exports_dir}", f"--format={model_format}",
         "--batch_size=8", str(images_folder)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=environment,
    )
    assert completed.returncode == 1, completed.stderr
    lines = completed.stderr.splitlines()
    for path in broken:
        assert [line for line in lines if path in line] == [f"error: {path}: not a decodable image"], completed.stderr
    noise = [line for line in lines if not line.startswith("error:")
             and re.search(r"(?i)jpeg|png|rendezvous|input file|corrupt|invalid", line)]
    assert noise == []
    assert sorted(line.split()[0] for line in completed.stdout.splitlines()[1:]) == sorted(good)
