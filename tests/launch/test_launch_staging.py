"""launch/staging.py: the wheel and data folders uploaded to a real GCS emulator (gcp-storage-emulator) on localhost."""

import io
import os
import socket
import subprocess
import sys
import time
import types
import zipfile

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from launch import local, staging
from tests.conftest import REPO_ROOT

BUCKET = "staging-test"
# Generous: a subprocess that starts Python on a loaded 2-core machine; the test never measures this.
SUBPROCESS_TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def emulator_host():
    """http://127.0.0.1:<port> of an in-memory gcp-storage-emulator, with the test bucket."""
    port = local.pick_free_ports(1)[0]
    process = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1", f"--port={port}", "--in-memory",
         f"--default-bucket={BUCKET}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_SECONDS  # ends as soon as it listens
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("gcp-storage-emulator did not start")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=SUBPROCESS_TIMEOUT_SECONDS)


@pytest.fixture
def client(emulator_host, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator_host)
    return storage.Client(project="test", credentials=AnonymousCredentials())


def test_split_gcs_uri():
    assert staging.split_gcs_uri("gs://bucket") == ("bucket", "")
    assert staging.split_gcs_uri("gs://bucket/a/b/") == ("bucket", "a/b")
    for bad in ("bucket/a", "gs:///a", "/tmp/x"):
        with pytest.raises(ValueError, match="must be gs://<bucket>"):
            staging.split_gcs_uri(bad)


def test_stage_uploads_an_installable_wheel_and_the_data(client, demo_data_dir, tmp_path):
    lines = staging.stage(client=client, staging_dir=f"gs://{BUCKET}/run1", local_paths=[str(demo_data_dir)], package=True)
    package_uri = lines[0].split()[1]
    assert lines[0].startswith(f"package gs://{BUCKET}/run1/packages/imagefolder_transfer-") and package_uri.endswith(".whl")
    wheel = zipfile.ZipFile(io.BytesIO(client.bucket(BUCKET).blob(package_uri.split("/", 3)[3]).download_as_bytes()))
    names = set(wheel.namelist())
    assert {"launch/local.py", "launch/vertex.py", "trainer/train.py", "tfrecords/build.py"} <= names
    assert not any(name.startswith("tests/") for name in names)

    local_files = sorted(str(path.relative_to(demo_data_dir)) for path in demo_data_dir.rglob("*") if path.is_file())
    data_uri = f"gs://{BUCKET}/run1/data/{demo_data_dir.name}"
    assert lines[1] == f"data {data_uri} ({len(local_files)} files)"
    prefix = f"run1/data/{demo_data_dir.name}/"
    uploaded = sorted(blob.name[len(prefix):] for blob in client.list_blobs(BUCKET, prefix=prefix))
    assert uploaded == local_files
    manifest = client.bucket(BUCKET).blob(prefix + "manifest.json").download_as_bytes()
    assert manifest == (demo_data_dir / "manifest.json").read_bytes()


def test_cli_uploads_a_file_without_the_package(emulator_host, tmp_path):
    data_file = tmp_path / "labels.txt"
    data_file.write_text("cat\ndog\n")
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "STORAGE_EMULATOR_HOST": emulator_host}
    result = subprocess.run(
        [sys.executable, "-m", "launch.staging", f"--staging_dir=gs://{BUCKET}", f"--local_path={data_file}",
         "--nopackage", "--project=test"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=environment, timeout=SUBPROCESS_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"data gs://{BUCKET}/data/labels.txt (1 files)\n"
    missing = subprocess.run(
        [sys.executable, "-m", "launch.staging", f"--staging_dir=gs://{BUCKET}", "--local_path=/no/such/folder"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=environment, timeout=SUBPROCESS_TIMEOUT_SECONDS,
    )
    assert missing.returncode == 2 and missing.stderr == "error: --local_path '/no/such/folder' does not exist\n"


def environment_without_credentials(tmp_path) -> dict[str, str]:
    """os.environ where any Google client fails at once: no emulator, no project, a missing credentials file."""
    closed_port = local.pick_free_ports(1)[0]
    environment = {name: value for name, value in os.environ.items()
                   if name not in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT")}
    return {**environment, "PYTHONPATH": str(REPO_ROOT),
            "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "no-such-credentials.json"),
            # A metadata-server probe, if anything made one, is refused on localhost instead of waiting on the network.
            "GCE_METADATA_HOST": f"127.0.0.1:{closed_port}", "GCE_METADATA_IP": f"127.0.0.1:{closed_port}"}


def test_cli_reports_a_missing_local_path_without_credentials(tmp_path):
    missing = subprocess.run(
        [sys.executable, "-m", "launch.staging", "--staging_dir=gs://some-bucket/staging", "--local_path=/no/such/folder"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=environment_without_credentials(tmp_path),
        timeout=SUBPROCESS_TIMEOUT_SECONDS,
    )
    assert missing.returncode == 2 and missing.stderr == "error: --local_path '/no/such/folder' does not exist\n"
    assert missing.stdout == ""


def never_create_a_client(*args, **kwargs):
    raise AssertionError("storage.Client was created before the local inputs were checked")


def run_main(monkeypatch, capsys, **flag_values) -> tuple[int, str]:
    """staging.main with these flag values and a storage.Client that fails the test if created; (exit code, stderr)."""
    flag_values = {"staging_dir": "gs://some-bucket/staging", "local_path": [], "project": None, "package": True,
                   **flag_values}
    monkeypatch.setattr(staging, "FLAGS", types.SimpleNamespace(**flag_values))
    monkeypatch.setattr(staging.storage, "Client", never_create_a_client)
    with pytest.raises(SystemExit) as exit_info:
        staging.main(["launch.staging"])
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("local_paths, bad", [
    (["/no/such/folder"], "/no/such/folder"),
    ([str(REPO_ROOT / "launch"), "/no/such/file.txt"], "/no/such/file.txt"),  # every path, not only the first
])
def test_main_checks_every_local_path_before_creating_the_storage_client(monkeypatch, capsys, local_paths, bad):
    code, stderr = run_main(monkeypatch, capsys, local_path=local_paths, package=False)
    assert code == 2 and stderr == f"error: --local_path {bad!r} does not exist\n"


def test_main_checks_the_staging_dir_before_creating_the_storage_client(monkeypatch, capsys):
    code, stderr = run_main(monkeypatch, capsys, staging_dir="my-bucket/staging")
    assert code == 2 and stderr == "error: --staging_dir 'my-bucket/staging' must be gs://<bucket>[/<folder>]\n"


def test_main_refuses_package_outside_a_source_checkout_before_creating_the_storage_client(monkeypatch, capsys,
                                                                                           tmp_path):
    # As when the installed `launch-staging` script runs: its project folder is site-packages, with no setup.py.
    monkeypatch.setattr(staging, "PROJECT_DIR", str(tmp_path))
    code, stderr = run_main(monkeypatch, capsys, package=True)
    assert code == 2 and stderr.startswith(f"error: --package builds the wheel from a source checkout, but {str(tmp_path)!r}")
    assert "--nopackage" in stderr and stderr.count("\n") == 1


def test_stage_refuses_package_outside_a_source_checkout(tmp_path):
    with pytest.raises(ValueError, match="has no setup.py"):
        staging.stage(client=None, staging_dir="gs://b", local_paths=[], package=True, project_dir=str(tmp_path))
