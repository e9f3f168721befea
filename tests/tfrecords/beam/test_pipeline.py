"""tfrecords.beam_build: the Beam pipeline writes the same bytes as tfrecords.build, and fails like it."""

from pathlib import Path
import subprocess
import sys

import pytest

beam_options = pytest.importorskip("apache_beam.options.pipeline_options")

from tests import entry_point_runs  # noqa: E402
from tfrecords.beam import pipeline  # noqa: E402 (after the importorskip: apache_beam is the `beam` extra)
from tfrecords import demo_images  # noqa: E402
from tfrecords.beam import planning  # noqa: E402
from tfrecords.run import conversion  # noqa: E402
from tfrecords.writing import shards  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[3]
# FnApiRunner: the in-process Python runner; DirectRunner would first try to download the Prism runner.
RUNNER = "--runner=FnApiRunner"
SETTINGS = {
    "validation_fraction": 0.2, "test_fraction": 0.2, "num_shards": 2, "target_shard_mb": 100, "seed": 7,
    "overwrite": False, "max_side": 64, "jpeg_quality": 80, "max_skipped_fraction": 0.5,
}
# Skipped before decoding (duplicates) and while writing (undecodable), with the start of the reason.
SKIPPED = {
    "circle/copy_of_000.jpg": "duplicate of circle/circle_000.jpg",
    "circle/notes.jpg": "not an image",
    "square/also_000.jpg": "duplicate of circle/circle_000.jpg",
    "square/empty.jpg": "empty file",
    "triangle/cut_in_half.jpg": "truncated or corrupt image",
}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """3 classes x 8 demo images, three undecodable files and two copies (one in another class)."""
    root = tmp_path_factory.mktemp("images")
    demo_images.write_demo_images(str(root), num_per_class=8, seed=3)
    original = (root / "circle" / "circle_000.jpg").read_bytes()
    (root / "circle" / "copy_of_000.jpg").write_bytes(original)
    (root / "square" / "also_000.jpg").write_bytes(original)
    (root / "circle" / "notes.jpg").write_text("not an image\n")
    (root / "square" / "empty.jpg").write_bytes(b"")
    real_jpeg = (root / "triangle" / "triangle_000.jpg").read_bytes()
    (root / "triangle" / "cut_in_half.jpg").write_bytes(real_jpeg[: len(real_jpeg) // 2])
    return root


@pytest.fixture(scope="module")
def local_output(image_dir, tmp_path_factory) -> tuple:
    """The output of the local converter (tfrecords.build) with SETTINGS: (manifest, its files' bytes)."""
    output_dir = tmp_path_factory.mktemp("local") / "output"
    options = conversion.ConversionOptions(num_workers=1, **SETTINGS)
    manifest = conversion.build(conversion.Source(input_dir=str(image_dir)), str(output_dir), options)
    return manifest, _output_files(output_dir)


def _output_files(output_dir: Path) -> dict:
    # flags.txt names the output folder, so it differs between folders by design.
    return {path.name: path.read_bytes() for path in sorted(output_dir.iterdir()) if path.name != "flags.txt"}


def _run_beam_build(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tfrecords.beam_build", *arguments],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )


def test_program_output_is_byte_identical_to_local_converter(image_dir, local_output, tmp_path):
    local_manifest, local_files = local_output
    output_dir = tmp_path / "output"
    flags = [f"--{name}={value}" for name, value in SETTINGS.items() if name != "overwrite"]
    result = _run_beam_build(f"--input_dir={image_dir}", f"--output_dir={output_dir}", *flags, RUNNER)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == conversion.summarize(manifest=local_manifest, output_dir=str(output_dir))

    beam_files = _output_files(output_dir)
    shard_names = [shard["file"] for split in local_manifest["splits"].values() for shard in split["shards"]]
    assert sorted(beam_files) == sorted(local_files) == sorted(shard_names + [".tfrecords_build", "labels.txt", "manifest.json"])
    for name in shard_names:
        assert beam_files[name] == local_files[name], f"{name} differs from the local converter's"
    # The whole manifest is identical too: shard sha256s, counts, skipped files and label conflicts.
    assert beam_files["manifest.json"] == local_files["manifest.json"]
    assert [entry["path"] for entry in local_manifest["skipped"]] == sorted(SKIPPED)
    for entry in local_manifest["skipped"]:
        assert entry["reason"].startswith(SKIPPED[entry["path"]])
    assert local_manifest["label_conflicts"] == [
        {"paths": ["circle/circle_000.jpg", "square/also_000.jpg"], "classes": ["circle", "square"]}
    ]
    assert f"--input_dir={image_dir}\n" in (output_dir / "flags.txt").read_text()


def test_resumed_pipeline_keeps_a_complete_shard(image_dir, local_output, tmp_path, monkeypatch):
    _, local_files = local_output
    monkeypatch.setattr(planning, "LISTED_FILES_PER_PLAN_FILE", 5)  # the listing in several files
    output_dir = tmp_path / "output"
    # An interrupted run: one shard complete (with its progress record), a stray partial file, no manifest.
    options = conversion.ConversionOptions(num_workers=1, **SETTINGS)
    prepared = conversion.prepare(conversion.Source(input_dir=str(image_dir)), str(output_dir), options)
    first = prepared.plan.tasks[0]
    shards.write_shard((first, str(output_dir), SETTINGS["max_side"], SETTINGS["jpeg_quality"], prepared.classes))
    (output_dir / (prepared.plan.tasks[1].file + shards.INCOMPLETE_SUFFIX)).write_bytes(b"partial")
    kept_mtime = (output_dir / first.file).stat().st_mtime_ns

    manifest = pipeline.build_with_beam(
        conversion.Source(input_dir=str(image_dir)), str(output_dir), conversion.ConversionOptions(**SETTINGS),
        pipeline.make_pipeline_options([RUNNER]),
    )
    assert _output_files(output_dir) == local_files
    assert (output_dir / first.file).stat().st_mtime_ns == kept_mtime
    assert sum(split["num_examples"] for split in manifest["splits"].values()) == 24


def test_task_file_round_trip(image_dir, tmp_path):
    options = conversion.ConversionOptions(num_workers=1, **SETTINGS)
    prepared = conversion.prepare(conversion.Source(input_dir=str(image_dir)), str(tmp_path / "output"), options)
    for task in prepared.plan.tasks:
        assert planning.task_from_json(planning.task_to_json(task)) == task


FLAG_ERRORS = [
    (["--max_side=-1"], "error: --max_side=-1 is negative"),
    (["--num_shard=2"], "error: --num_shard is neither a flag of tfrecords.beam_build"),
    (
        ["--runner=DataflowRunner", "--project=demo", "--region=us-central1", "--temp_location=gs://demo/tmp"],
        "error: --input_dir '{input_dir}' is not on gs://",
    ),
]


@pytest.fixture(scope="module")
def flag_error_runs(image_dir, tmp_path_factory) -> list:
    """(folder, result) of tfrecords.beam_build for each of FLAG_ERRORS, all in one process (tests/entry_point_runs.py)."""
    folders = [tmp_path_factory.mktemp("flag_error") for _ in FLAG_ERRORS]
    argument_lists = [
        [f"--input_dir={image_dir}", f"--output_dir={folder / 'output'}", *arguments]
        for folder, (arguments, _) in zip(folders, FLAG_ERRORS)
    ]
    return list(zip(folders, entry_point_runs.run_each("tfrecords.beam_build", argument_lists)))


@pytest.mark.parametrize("case", range(len(FLAG_ERRORS)), ids=["negative_max_side", "mistyped_flag", "dataflow_local_input"])
def test_program_flag_errors_exit_2_with_one_line(flag_error_runs, image_dir, case):
    folder, result = flag_error_runs[case]
    assert result.returncode == 2, result.stderr[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert error_lines[0].startswith(FLAG_ERRORS[case][1].format(input_dir=image_dir))
    assert "Traceback" not in result.stderr
    assert not (folder / "output").exists()
