"""Shard writing: TFRecord framing, resume after a kill -9, and identical output whatever the workers."""

import io
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from tfrecords.writing import shards

REPO_ROOT = Path(__file__).resolve().parents[3]
ENVIRONMENT = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO_ROOT)}
NUM_IMAGES = 300
NUM_SHARDS = 10


def test_frame_record_matches_tensorflow(tmp_path):
    payloads = [b"", b"a", b"hello world" * 100]
    with open(tmp_path / "ours.tfrecord", "wb") as output:
        for payload in payloads:
            output.write(shards.frame_record(payload))
    assert [record.numpy() for record in tf.data.TFRecordDataset(str(tmp_path / "ours.tfrecord"))] == payloads
    with tf.io.TFRecordWriter(str(tmp_path / "theirs.tfrecord")) as writer:
        for payload in payloads:
            writer.write(payload)
    assert (tmp_path / "ours.tfrecord").read_bytes() == (tmp_path / "theirs.tfrecord").read_bytes()


@pytest.fixture(scope="module")
def noisy_image_dir(tmp_path_factory) -> Path:
    """300 noisy 192x144 PNGs in 3 classes: slow enough to convert (PNG decode, JPEG encode) to kill mid-run."""
    root = tmp_path_factory.mktemp("noisy")
    rng = np.random.default_rng(0)
    for index in range(NUM_IMAGES):
        class_dir = root / ("a", "b", "c")[index % 3]
        class_dir.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, size=(144, 192, 3), dtype=np.uint8)
        output = io.BytesIO()
        Image.fromarray(pixels).save(output, format="PNG", compress_level=1)
        (class_dir / f"{index:04d}.png").write_bytes(output.getvalue())
    return root


def _command(input_dir: Path, output_dir: Path, num_workers: int) -> list:
    return [
        sys.executable, "-m", "tfrecords.build", f"--input_dir={input_dir}", f"--output_dir={output_dir}",
        f"--num_shards={NUM_SHARDS}", "--validation_fraction=0", "--test_fraction=0",
        f"--num_workers={num_workers}",
    ]


def _run(input_dir: Path, output_dir: Path, num_workers: int) -> subprocess.CompletedProcess:
    result = subprocess.run(
        _command(input_dir, output_dir, num_workers), cwd=REPO_ROOT, env=ENVIRONMENT, capture_output=True,
        text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _output_files(output_dir: Path) -> dict:
    # flags.txt names the output folder, so it differs between folders by design.
    return {path.name: path.read_bytes() for path in sorted(output_dir.iterdir()) if path.name != "flags.txt"}


@pytest.fixture(scope="module")
def clean_output(noisy_image_dir, tmp_path_factory) -> dict:
    output_dir = tmp_path_factory.mktemp("clean") / "output"
    result = _run(noisy_image_dir, output_dir, num_workers=1)
    assert f"converted {NUM_IMAGES}, skipped 0" in result.stdout
    return _output_files(output_dir)


def test_output_is_identical_with_two_workers(noisy_image_dir, clean_output, tmp_path):
    _run(noisy_image_dir, tmp_path / "output", num_workers=2)
    assert _output_files(tmp_path / "output") == clean_output


def test_kill_and_resume_gives_identical_output(noisy_image_dir, clean_output, tmp_path):
    output_dir = tmp_path / "output"
    process = subprocess.Popen(
        _command(noisy_image_dir, output_dir, num_workers=1), cwd=REPO_ROOT, env=ENVIRONMENT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not list(output_dir.glob("train-*.tfrecord")) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    complete = list(output_dir.glob("train-*.tfrecord"))
    assert complete, "no shard was complete within 120 s"
    assert len(complete) < NUM_SHARDS and not (output_dir / "manifest.json").exists(), "killed too late"

    # No manifest yet, so the rerun resumes without --overwrite; complete shards are kept as they are.
    kept = {path.name: path.stat().st_mtime_ns for path in complete}
    result = _run(noisy_image_dir, output_dir, num_workers=1)
    assert f"converted {NUM_IMAGES}, skipped 0" in result.stdout
    assert _output_files(output_dir) == clean_output
    assert all((output_dir / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())


def test_incomplete_and_corrupt_shards_are_rewritten(noisy_image_dir, clean_output, tmp_path):
    output_dir = tmp_path / "output"
    _run(noisy_image_dir, output_dir, num_workers=2)
    # Fake an interrupted run: manifest not written yet, progress records still there.
    progress_dir = output_dir / shards.PROGRESS_FOLDER
    progress_dir.mkdir()
    manifest = json.loads((output_dir / "manifest.json").read_text())
    (output_dir / "manifest.json").unlink()
    names = [shard["file"] for shard in manifest["splits"]["train"]["shards"]]
    for name in names:
        shard = next(s for s in manifest["splits"]["train"]["shards"] if s["file"] == name)
        (progress_dir / f"{name}.json").write_text(json.dumps({"fingerprint": "stale", **shard}))
    (output_dir / names[0]).write_bytes(b"looks complete but is not")
    (output_dir / f"{names[1]}.incomplete").write_bytes(b"partial")
    (output_dir / names[2]).unlink()
    _run(noisy_image_dir, output_dir, num_workers=2)
    assert _output_files(output_dir) == clean_output
