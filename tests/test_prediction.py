"""trainer/prediction.py: batched labelling, path expansion, bad files, CSV/JSON/table output, CLI exit codes."""

import csv
import io
import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer import export, prediction
from trainer import model as model_lib

CLASS_NAMES = ["cat", "dog", "fox", "owl"]
IMAGE_SIZE = 32
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A --model_dir holding an exported 4-class model and its labels.txt."""
    model = model_lib.build_model(
        model_lib.ModelSpec(
            backbone="mobilenet_v2", image_size=IMAGE_SIZE, weights="none", preprocess="tf", dropout=0.0,
        ),
        num_classes=len(CLASS_NAMES),
    )
    # A random head, so the probabilities differ between classes and the top-k order means something (the
    # untrained backbone's features are near zero whatever the image, so the head's bias decides).
    head = model.layers[-1]
    rng = np.random.default_rng(0)
    head.set_weights([rng.normal(0, 1, weight.shape).astype("float32") for weight in head.get_weights()])
    folder = tmp_path_factory.mktemp("model_dir")
    export.export_saved_model(
        model=model, class_names=CLASS_NAMES, image_size=IMAGE_SIZE, export_dir=str(folder / export.SAVED_MODEL_DIR)
    )
    (folder / prediction.LABELS_FILE).write_text("".join(name + "\n" for name in CLASS_NAMES))
    return folder


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
        outputs = serve(image_bytes=tf.constant([prediction.read_file(path)]))
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
    found = prediction.list_images([
        str(tmp_path / "photos"), str(tmp_path / "loose*.png"), str(tmp_path / "photos" / "a.jpg"),
        str(tmp_path / "glob*"),
    ])
    assert [path.replace(str(tmp_path), "") for path in found] == [
        "/photos/a.jpg", "/photos/b.png", "/photos/nested/c.png", "/loose1.png", "/loose2.png", "/globbed/e.png",
    ]
    # A hidden file named explicitly is kept.
    assert prediction.list_images([str(tmp_path / ".loose3.png")]) == [str(tmp_path / ".loose3.png")]
    with pytest.raises(ValueError, match="neither a file, a folder nor a glob"):
        prediction.list_images([str(tmp_path / "missing*.jpg")])
    (tmp_path / "empty" / ".only_hidden").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no files"):
        prediction.list_images([str(tmp_path / "empty")])


def test_corrupt_file_among_good_ones_is_reported_and_the_rest_labelled(model_dir, serve, tmp_path):
    images = tmp_path / "images"
    good = write_images(images, ["a.png", "b.jpg", "d.png", "e.png"])
    (images / "c.jpg").write_bytes(b"not an image")
    (images / "empty.png").write_bytes(b"")
    bad = [str(images / "c.jpg"), str(images / "empty.png")]
    results, failures = prediction.predict_files(
        serve=serve, paths=prediction.list_images([str(images)]), class_names=CLASS_NAMES, top_k=2, batch_size=4
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


def test_csv_and_json_outputs_hold_sorted_top_k(serve, tmp_path):
    paths = write_images(tmp_path, ["a.png", "b.jpg", "c.png"])
    results, _ = prediction.predict_files(serve=serve, paths=paths, class_names=CLASS_NAMES, top_k=3, batch_size=8)

    prediction.write_predictions(results=results, path=str(tmp_path / "predictions.csv"))
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

    prediction.write_predictions(results=results, path=str(tmp_path / "predictions.json"))
    written = json.loads((tmp_path / "predictions.json").read_text())
    assert [item["path"] for item in written] == paths
    for item, result in zip(written, results):
        check_sorted_top_k(item, top_k=3)
        assert item["probability"] == pytest.approx(result["probability"], abs=1e-6)
    assert sorted(path.name for path in tmp_path.iterdir() if "predictions" in path.name) == [
        "predictions.csv", "predictions.json",  # no temporary file left behind
    ]

    with pytest.raises(ValueError, match="must end in .csv or .json"):
        prediction.write_predictions(results=results, path=str(tmp_path / "predictions.tsv"))

    table = prediction.format_table(results).splitlines()
    assert table[0].split() == ["path", "class_name", "probability", "top_k"]
    assert [line.split()[:3] for line in table[1:]] == [
        [result["path"], result["class_name"], f"{result['probability']:.4f}"] for result in results
    ]
    assert all(line.count(",") == 2 for line in table[1:])  # three "name probability" pairs
    assert prediction.format_table([]) == ""


def test_ram_filesystem_for_images_and_output(serve):
    root = f"ram://predict-{uuid.uuid4().hex}"
    tf.io.gfile.makedirs(f"{root}/images/nested")
    for name, encoded in [("a.png", encode(0)), ("nested/b.jpg", encode(1, "JPEG")), (".hidden.png", encode(2))]:
        with tf.io.gfile.GFile(f"{root}/images/{name}", "wb") as file:
            file.write(encoded)
    paths = prediction.list_images([f"{root}/images"])
    assert paths == [f"{root}/images/a.png", f"{root}/images/nested/b.jpg"]
    results, failures = prediction.predict_files(serve=serve, paths=paths, class_names=CLASS_NAMES, top_k=2, batch_size=2)
    assert failures == {} and len(results) == 2
    prediction.write_predictions(results=results, path=f"{root}/out/predictions.json")
    with tf.io.gfile.GFile(f"{root}/out/predictions.json", "r") as file:
        assert [item["path"] for item in json.load(file)] == paths
    assert tf.io.gfile.listdir(f"{root}/out") == ["predictions.json"]


def test_an_unknown_format_or_a_missing_export_is_a_clear_error(model_dir):
    with pytest.raises(ValueError, match="--format='pt' is not one of"):
        prediction.load_serving(model_dir=str(model_dir), model_format="pt")
    with pytest.raises(ValueError, match="no TFLite model at"):
        prediction.load_serving(model_dir=str(model_dir), model_format="tflite")
