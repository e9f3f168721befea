"""launch/vertex.py: the CustomJobSpec of each shape, the gcloud command, and flag errors (dry runs only)."""

import json
import shlex
import subprocess
import sys
import types

import pytest

from launch import vertex
from tests.conftest import REPO_ROOT

DEFAULTS = dict(
    image_uri="us-docker.pkg.dev/p/r/image:1", trainer_flags=["--data_dir=gs://b/data", "--model_dir=gs://b/model"],
    num_workers=3, machine_type="", accelerator_type="", accelerator_count=0, tpu_topology="",
    staging_bucket="gs://b/staging", service_account="", spot=False, restart_job_on_worker_restart=True, timeout_hours=0,
)


# Generous: a subprocess that starts Python on a loaded 2-core machine; the test never measures this.
SUBPROCESS_TIMEOUT_SECONDS = 300

MACHINE_FIELDS = ("machine_type", "accelerator_type", "accelerator_count", "tpu_topology")


def make_job_spec(**settings) -> dict:
    """vertex.make_job_spec with the machine's fields given like the others."""
    machine = vertex.Machine(**{name: settings.pop(name) for name in MACHINE_FIELDS})
    return vertex.make_job_spec(machine=machine, **settings)


def check_pool(pool, *, replica_count, image_uri, strategy):
    assert pool["replicaCount"] == replica_count
    assert pool["machineSpec"]["machineType"]
    assert pool["containerSpec"]["imageUri"] == image_uri
    args = pool["containerSpec"]["args"]
    assert args[:2] == DEFAULTS["trainer_flags"], "trainer flags pass through verbatim, first"
    assert f"--strategy={strategy}" in args


def test_single_machine_with_gpus_is_mirrored():
    spec = make_job_spec(shape="single", **{**DEFAULTS, "accelerator_type": "NVIDIA_L4", "accelerator_count": 4})
    (pool,) = spec["workerPoolSpecs"]
    check_pool(pool, replica_count=1, image_uri=DEFAULTS["image_uri"], strategy="mirrored")
    assert pool["machineSpec"] == {"machineType": "n1-standard-8", "acceleratorType": "NVIDIA_L4", "acceleratorCount": 4}
    assert spec["scheduling"]["restartJobOnWorkerRestart"] is True
    assert spec["baseOutputDirectory"] == {"outputUriPrefix": "gs://b/staging"}


def test_multi_worker_has_a_chief_pool_and_a_workers_pool():
    spec = make_job_spec(shape="multi_worker", **{**DEFAULTS, "spot": True, "timeout_hours": 2})
    chief, workers = spec["workerPoolSpecs"]
    check_pool(chief, replica_count=1, image_uri=DEFAULTS["image_uri"], strategy="multi_worker")
    check_pool(workers, replica_count=2, image_uri=DEFAULTS["image_uri"], strategy="multi_worker")
    assert chief["machineSpec"] == workers["machineSpec"]
    assert spec["scheduling"] == {"restartJobOnWorkerRestart": True, "strategy": "SPOT", "timeout": "7200s"}


def test_tpu_runs_the_tpu_strategy_locally_in_bfloat16():
    spec = make_job_spec(shape="tpu", **DEFAULTS)
    (pool,) = spec["workerPoolSpecs"]
    check_pool(pool, replica_count=1, image_uri=DEFAULTS["image_uri"], strategy="tpu")
    assert pool["machineSpec"] == {"machineType": "cloud-tpu", "acceleratorType": "TPU_V3", "acceleratorCount": 8}
    assert pool["containerSpec"]["args"][2:] == ["--strategy=tpu", "--tpu=local", "--precision=mixed_bfloat16"]
    v5e = make_job_spec(shape="tpu", **{**DEFAULTS, "machine_type": "ct5lp-hightpu-4t", "accelerator_type": "TPU_V5_LITEPOD",
                                               "accelerator_count": 4, "tpu_topology": "2x2",
                                               "trainer_flags": ["--precision=float32"]})
    assert v5e["workerPoolSpecs"][0]["machineSpec"]["tpuTopology"] == "2x2"
    assert "--precision=float32" in v5e["workerPoolSpecs"][0]["containerSpec"]["args"]


@pytest.mark.parametrize("changes, message", [
    (dict(shape="multi_worker", num_workers=1), "--num_workers 1 must be at least 2"),
    (dict(shape="tpu", accelerator_type="NVIDIA_TESLA_T4"), "--shape=tpu needs a TPU machine"),
    (dict(shape="single", accelerator_type="TPU_V3"), "--accelerator_type TPU_V3 is a TPU"),
    (dict(shape="single", staging_bucket="/tmp/x"), "--staging_bucket '/tmp/x' must be a gs:// path"),
    (dict(shape="single", image_uri=""), "--image_uri '' must be a container image"),
    (dict(shape="single", trainer_flags=["--strategy=tpu"]), "trainer flag --strategy=tpu conflicts"),
])
def test_invalid_flags_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        make_job_spec(**{**DEFAULTS, **changes})


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "launch.vertex", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
                          timeout=SUBPROCESS_TIMEOUT_SECONDS)


def test_dry_run_prints_the_spec_and_the_gcloud_command(tmp_path):
    spec_file = tmp_path / "spec.json"
    result = run_cli("--project=my-project", "--display_name=flowers mw", "--image_uri=gcr.io/p/i:1", "--shape=multi_worker",
                     "--num_workers=4", f"--spec_file={spec_file}", "--dry_run", "--",
                     "--data_dir=gs://b/d", "--model_dir=gs://b/it's here")
    assert result.returncode == 0, result.stderr
    spec, end = json.JSONDecoder().raw_decode(result.stdout)
    assert json.loads(spec_file.read_text()) == spec
    assert [pool["replicaCount"] for pool in spec["workerPoolSpecs"]] == [1, 3]
    assert spec["workerPoolSpecs"][1]["containerSpec"]["args"][1] == "--model_dir=gs://b/it's here"
    command = shlex.split(result.stdout[end:].strip())
    assert command == ["gcloud", "ai", "custom-jobs", "create", "--project=my-project", "--region=us-central1",
                       "--display-name=flowers mw", f"--config={spec_file}"]


@pytest.mark.parametrize("args, message", [
    (["--shape=gpu"], "error: flag --shape=gpu"),
    (["--image_uri=i", "--region=Europe"], "error: --region 'Europe' is not a region name"),
    (["--image_uri=i"], "error: --project is required to submit"),
    (["--image_uri=i", "--data_dir=x"], "error: Unknown command line flag 'data_dir' (trainer flags go after `--`)"),
])
def test_cli_errors_are_one_line_with_exit_code_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("dry_run", [True, False])
def test_cli_spec_file_in_a_missing_folder_is_one_line_and_writes_nothing(tmp_path, dry_run):
    # Before: open() raised FileNotFoundError, a traceback (exit 1) instead of one line and exit 2.
    spec_file = tmp_path / "no_such_folder" / "spec.json"
    result = run_cli("--project=my-project", "--image_uri=gcr.io/p/i:1", f"--spec_file={spec_file}",
                     *(["--dry_run"] if dry_run else []))
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"error: --spec_file {str(spec_file)!r}: its folder {str(spec_file.parent)!r} does not "
                             "exist; create it or give another path\n")
    assert result.stdout == "" and not spec_file.parent.exists()


def never_run_a_tool(command, **kwargs):
    raise AssertionError(f"{command[0]} was run before the local inputs were checked")


def run_main(monkeypatch, capsys, **flag_values) -> tuple[int, str]:
    """vertex.main (--action=train) with these flag values and a run_tool that fails the test; (exit code, stderr)."""
    flag_values = {
        "action": "train", "shape": "single", "image_uri": "gcr.io/p/i:1", "num_workers": 2, "machine_type": "",
        "accelerator_type": "", "accelerator_count": 0, "tpu_topology": "", "staging_bucket": None,
        "service_account": "", "spot": False, "restart_job_on_worker_restart": True, "timeout_hours": 0,
        "project": "my-project", "region": "us-central1", "display_name": "flowers", "spec_file": "", "dry_run": False,
        **flag_values,
    }
    monkeypatch.setattr(vertex, "FLAGS", types.SimpleNamespace(**flag_values))
    monkeypatch.setattr(vertex.trainer_args, "run_tool", never_run_a_tool)
    with pytest.raises(SystemExit) as exit_info:
        vertex.main(["launch.vertex"])
    return exit_info.value.code, capsys.readouterr().err


def test_main_requires_the_project_before_writing_the_spec_file(monkeypatch, capsys, tmp_path):
    # Before: --spec_file was written, then the run stopped for want of --project, leaving a file behind.
    spec_file = tmp_path / "spec.json"
    code, stderr = run_main(monkeypatch, capsys, project=None, spec_file=str(spec_file))
    assert code == 2 and stderr == "error: --project is required to submit (or pass --dry_run)\n"
    assert not spec_file.exists()


@pytest.mark.parametrize("dry_run", [True, False])
def test_main_refuses_a_spec_file_that_is_a_folder(monkeypatch, capsys, tmp_path, dry_run):
    code, stderr = run_main(monkeypatch, capsys, spec_file=str(tmp_path), dry_run=dry_run)
    assert code == 2
    assert stderr == f"error: --spec_file {str(tmp_path)!r} is a folder; give a file path such as {str(tmp_path / vertex.PLACEHOLDER_SPEC_FILE)!r}\n"


def test_main_refuses_a_spec_file_under_a_file(monkeypatch, capsys, tmp_path):
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("")
    code, stderr = run_main(monkeypatch, capsys, spec_file=str(not_a_folder / "spec.json"), dry_run=True)
    assert code == 2 and stderr.endswith(f"its folder {str(not_a_folder)!r} is a file, not a folder; create it or give "
                                         "another path\n")
    assert not_a_folder.read_text() == ""
