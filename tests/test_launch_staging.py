"""launch/staging.py: the wheel and data folders uploaded to a real GCS emulator (gcp-storage-emulator) on localhost."""

import io
import os
import socket
import subprocess
import sys
import time
import zipfile

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from launch import local, staging
from tests.conftest import REPO_ROOT

BUCKET = "staging-test"


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
        deadline = time.monotonic() + 30
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
        process.wait(timeout=10)


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
        cwd=REPO_ROOT, capture_output=True, text=True, env=environment, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"data gs://{BUCKET}/data/labels.txt (1 files)\n"
    missing = subprocess.run(
        [sys.executable, "-m", "launch.staging", f"--staging_dir=gs://{BUCKET}", "--local_path=/no/such/folder"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=environment, timeout=60,
    )
    assert missing.returncode == 2 and missing.stderr == "error: --local_path '/no/such/folder' does not exist\n"
