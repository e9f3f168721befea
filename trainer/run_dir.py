"""Who may write a --model_dir, and which model it holds: the run's identity and its lock.

A model_dir belongs to one model. `run.json` records what defines it: the data's classes and a
fingerprint of its manifest (classes, shard names, sizes and checksums), the backbone(s), their weights,
preprocessing, cut layer, image size and head. A rerun whose identity matches resumes; one that differs
stops before writing anything, naming what differs. A folder that holds files but no `run.json` is
not ours, and is refused rather than written into.

Only one run writes a model_dir at a time: the chief holds `run.lock`, created only if absent (O_EXCL
locally, a generation-0 precondition on gs://), and refreshes its heartbeat every HEARTBEAT_SECONDS.
A lock is stale when its process is known dead (same host, no such pid) or its heartbeat is older than
STALE_SECONDS (a preempted machine that never came back): a stale lock is taken over with a warning
naming it; a live one stops the run with the command that clears it if the user knows better.
"""

import dataclasses
import hashlib
import json
import os
import socket
import threading
import time

from absl import logging
import tensorflow as tf

from tfrecords import schema

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0
# What only training writes (checkpoints.CHECKPOINT_DIR, reporting.HISTORY_FILE, run.METRICS_FILE).
TRAINING_OUTPUTS = ("checkpoints", "history.json", "metrics.json")


class RunDirError(ValueError):
    """The model_dir cannot be used by this run (another model's, not ours, or locked); nothing was written."""


def manifest_fingerprint(manifest: dict) -> str:
    """sha256 of what the model learns from in a manifest: classes and every shard's name, size and sha256.

    The source paths and the conversion flags are left out, so data copied to gs:// keeps its fingerprint.
    """
    content = {
        "classes": manifest["classes"],
        "splits": {
            name: [[shard["file"], shard.get("size_bytes"), shard.get("sha256")] for shard in split["shards"]]
            for name, split in sorted(manifest["splits"].items())
        },
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()


def check_identity(*, model_dir: str, identity: dict) -> None:
    """Raises RunDirError when model_dir holds another model, or files that are not a trainer run.

    Args:
        model_dir: the --model_dir (local or gs://); it may not exist yet.
        identity: what defines this run's model (JSON-able; see trainer/train.py).
    """
    if not tf.io.gfile.exists(model_dir):
        return
    if not tf.io.gfile.isdir(model_dir):
        raise RunDirError(f"--model_dir {model_dir!r} is a file; pass a folder (new, or of an earlier run to resume)")
    run_path = tf.io.gfile.join(model_dir, RUN_FILE)
    if not tf.io.gfile.exists(run_path):
        foreign = sorted(name.rstrip("/") for name in tf.io.gfile.listdir(model_dir) if name.rstrip("/") != LOCK_FILE)
        if foreign:
            raise RunDirError(
                f"--model_dir {model_dir!r} is not empty ({', '.join(repr(name) for name in foreign[:3])}) and has no "
                f"{RUN_FILE}, so it is not a trainer run this version can resume; pass a new or empty --model_dir"
            )
        return
    with tf.io.gfile.GFile(run_path, "r") as file:
        recorded = json.load(file)
    differences = [
        f"{key} was {recorded.get(key)!r}, now {identity.get(key)!r}"
        for key in sorted(set(recorded) | set(identity))
        if recorded.get(key) != identity.get(key)
    ]
    if differences and not has_trained(model_dir):
        # A run that stopped before its first checkpoint (e.g. a bad --image_size) left nothing to protect.
        logging.info("--model_dir %s holds no training yet; starting it anew (%s)", model_dir, "; ".join(differences))
        return
    if differences:
        raise RunDirError(
            f"--model_dir {model_dir!r} holds another model ({'; '.join(differences)}); resume it with the same data "
            "and model flags, or start fresh with a new --model_dir (or delete this one)"
        )


def has_trained(model_dir: str) -> bool:
    """True when model_dir holds a checkpoint, a training history or metrics (names as in trainer/checkpoints.py, reporting.py, run.py)."""
    return any(tf.io.gfile.exists(tf.io.gfile.join(model_dir, name)) for name in TRAINING_OUTPUTS)


def write_identity(*, model_dir: str, identity: dict) -> None:
    """Writes run.json (atomically) into model_dir, which exists."""
    schema.write_text(tf.io.gfile.join(model_dir, RUN_FILE), json.dumps(identity, indent=2, sort_keys=True) + "\n")


@dataclasses.dataclass
class Lock:
    """A held run.lock; release() it when the run ends (train.py does, in a finally)."""

    path: str
    content: dict
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                _write_lock(self.path, {**self.content, "heartbeat": time.time()}, exclusive=False)
            except Exception as error:  # pylint: disable=broad-except  # a missed beat only makes the lock look older
                logging.warning("could not refresh %s: %s", self.path, error)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        _remove_lock(self.path)


def acquire_lock(model_dir: str) -> Lock:
    """Creates model_dir if needed and takes its run.lock.

    Raises:
        RunDirError: another live run holds the lock (the message says how to clear it if it is dead).
    """
    if not model_dir.startswith("gs://"):  # Cloud Storage has no folders to check or create
        if tf.io.gfile.exists(model_dir) and not tf.io.gfile.isdir(model_dir):
            raise RunDirError(f"--model_dir {model_dir!r} is a file; pass a folder (new, or of an earlier run to resume)")
        tf.io.gfile.makedirs(model_dir)
    path = tf.io.gfile.join(model_dir, LOCK_FILE)
    content = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    for _ in range(2):
        if _write_lock(path, {**content, "heartbeat": time.time()}, exclusive=True):
            lock = Lock(path=path, content=content)
            lock.start_heartbeat()
            return lock
        holder = _read_lock(path)
        stale = describe_stale(holder)
        if stale is None:
            age = time.time() - float(holder.get("heartbeat", 0))
            raise RunDirError(
                f"--model_dir {model_dir!r} is in use by another run (host {holder.get('host')!r}, pid "
                f"{holder.get('pid')}, heartbeat {age:.0f} s ago); wait for it, use another --model_dir, or, if that "
                f"run is dead, delete {path}"
            )
        logging.warning("taking over %s: %s", path, stale)
        print(f"warning: taking over the lock of a dead run in {model_dir} ({stale})", flush=True)
        _remove_stale_lock(path, holder)
    raise RunDirError(f"--model_dir {model_dir!r}: could not take {path}; another run is starting; retry")


def describe_stale(holder: dict) -> str | None:
    """Why a lock's holder is known dead, or None while it may be alive."""
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > STALE_SECONDS:
        return f"its heartbeat is {age:.0f} s old (host {holder.get('host')!r}, pid {holder.get('pid')})"
    if holder.get("host") == socket.gethostname() and not _process_alive(int(holder.get("pid", -1))):
        return f"process {holder.get('pid')} on this host has exited"
    return None


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(path: str) -> dict:
    """The lock's content ({} when it is gone); "_generation" is the gs:// object's, for a safe takeover."""
    if path.startswith("gs://"):
        from google.api_core import exceptions

        blob = _gcs_blob(path)
        try:
            text = blob.download_as_text()
        except exceptions.NotFound:
            return {}
        holder = _parse_lock(text, modified=blob.updated.timestamp() if blob.updated else 0.0)
        return {**holder, "_generation": blob.generation}
    try:
        with tf.io.gfile.GFile(path, "r") as file:
            text = file.read()
        return _parse_lock(text, modified=tf.io.gfile.stat(path).mtime_nsec / 1e9)
    except tf.errors.NotFoundError:
        return {}  # released meanwhile: stale, so the caller retries the create


def _parse_lock(text: str, *, modified: float) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # Created but not yet written (or its writer died then): as old as the file itself.
        return {"heartbeat": modified}


def _remove_stale_lock(path: str, holder: dict) -> None:
    """Removes a stale lock so that exactly one of several reruns can then create its own."""
    if path.startswith("gs://"):
        from google.api_core import exceptions

        try:
            # Only the lock that was judged stale: not one another rerun created meanwhile.
            _gcs_blob(path).delete(if_generation_match=holder.get("_generation"))
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            pass
        return
    # Only one rerun can rename the stale lock away; a loser finds it gone and competes for the new one.
    try:
        tf.io.gfile.rename(path, f"{path}.stale-{os.getpid()}", overwrite=True)
        tf.io.gfile.remove(f"{path}.stale-{os.getpid()}")
    except tf.errors.NotFoundError:
        pass


def _remove_lock(path: str) -> None:
    if path.startswith("gs://"):
        from google.api_core import exceptions

        try:
            _gcs_blob(path).delete()
        except exceptions.NotFound:
            pass
    elif tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)


def _write_lock(path: str, content: dict, *, exclusive: bool) -> bool:
    """Writes the lock file; with exclusive, only if absent. Returns False when it already existed."""
    text = json.dumps(content) + "\n"
    if path.startswith("gs://"):
        return _write_gcs_lock(path, text, exclusive=exclusive)
    if not exclusive:
        # A heartbeat replaces the file whole (rename), so a reader never sees it half-written.
        schema.write_text(path, text)
        return True
    if "://" not in path:
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        return True
    # Other file systems (ram:// in tests, hdfs://) have no create-if-absent: check, then write.
    if tf.io.gfile.exists(path):
        return False
    schema.write_text(path, text)
    return True


def _gcs_blob(path: str):
    # Imported here: only gs:// model_dirs need the client (it honours STORAGE_EMULATOR_HOST). TensorFlow's
    # gs:// file system has no create-if-absent, so the lock goes through Cloud Storage's own API.
    from google.cloud import storage

    bucket_name, _, name = path[len("gs://"):].partition("/")
    return storage.Client().bucket(bucket_name).blob(name)


def _write_gcs_lock(path: str, text: str, *, exclusive: bool) -> bool:
    from google.api_core import exceptions

    blob = _gcs_blob(path)
    try:
        # Generation 0 means "no live object": the create succeeds for exactly one writer.
        blob.upload_from_string(text, if_generation_match=0 if exclusive else None)
    except exceptions.PreconditionFailed:
        return False
    return True
