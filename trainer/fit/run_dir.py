"""Who may write a --model_dir, and which model it holds: the run's identity and its lock.

A model_dir belongs to one model. `run.json` records what defines it: the data's classes and a
fingerprint of its manifest (classes, shard names, sizes and checksums), the backbone(s), their weights,
preprocessing, cut layer, image size and head. A rerun whose identity matches resumes; one that differs
stops before writing anything, naming what differs. A folder that holds files but no `run.json` is
not ours, and is refused rather than written into.

Only one run writes a model_dir at a time: the chief holds `run.lock`, created only if absent (O_EXCL
locally, a generation-0 precondition on gs://), carrying a token of its own, and refreshes its heartbeat
every HEARTBEAT_SECONDS. A lock is stale when its process is known dead: on the same host, when no such
process lives (a live one is never taken over, whatever its heartbeat: it may only be paused, by Ctrl-Z,
a suspended laptop, a stopped container or a long GC pause); on another host, when its heartbeat is older
than STALE_SECONDS (a preempted machine that never came back). A stale lock is taken over with a warning
naming it; a live one stops the run with the command that clears it if the user knows better.

A run keeps and releases only a lock that is still its own: each heartbeat first checks the token (on
gs://, writes on the generation it last wrote), and a run that finds its lock taken, by a run on another
host while it was paused, prints one error line and exits at once (LOST_EXIT_CODE) without writing more;
Lock.check() lets the training loop find the same before each write, should it resume first.
"""

import dataclasses
import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable

from absl import logging
import tensorflow as tf

from tfrecords import schema

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0
LOST_EXIT_CODE = 2  # as train.py's other run-dir errors: not retried by launchers (75 is)
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
        # run.lock, and what a lock's write or takeover can leave (run.lock.incomplete, run.lock.stale-*).
        names = [name.rstrip("/") for name in tf.io.gfile.listdir(model_dir)]
        foreign = sorted(name for name in names if not name.startswith(LOCK_FILE))
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
    """True when model_dir holds a checkpoint, a training history or metrics (names as in trainer/fit/checkpoints.py, reporting.py, run.py)."""
    return any(tf.io.gfile.exists(tf.io.gfile.join(model_dir, name)) for name in TRAINING_OUTPUTS)


def write_identity(*, model_dir: str, identity: dict) -> None:
    """Writes run.json (atomically) into model_dir, which exists."""
    schema.write_text(tf.io.gfile.join(model_dir, RUN_FILE), json.dumps(identity, indent=2, sort_keys=True) + "\n")


class LockLost(RunDirError):
    """This run's run.lock was taken over (or removed) while it ran: it must stop writing into its model_dir."""


def stop_process(message: str) -> None:
    """What a Lock does by default when its heartbeat finds the lock taken: one error line, then exit at once.

    The heartbeat runs in a daemon thread, which cannot raise into the main thread; and a normal exit would
    run `finally` blocks and exit handlers that write (a checkpoint on SIGTERM, TensorBoard's last events,
    the lock's release). os._exit writes nothing more.
    """
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(LOST_EXIT_CODE)


@dataclasses.dataclass
class Lock:
    """A held run.lock; release() it when the run ends (train.py does, in a finally).

    content carries a token unique to this run, so that the heartbeat, check() and release() can tell
    whether the lock is still this run's; generation is the gs:// object's as this run last wrote it (0
    elsewhere). on_lost is called, from the heartbeat thread, with a one-line message when the lock is
    found taken; check() raises LockLost in the main thread, before a write.
    """

    path: str
    content: dict
    generation: int = 0
    on_lost: Callable[[str], None] = stop_process
    lost: str | None = None
    _guard: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            # Held while on_lost ends the process: a check() in the main thread cannot print a second line.
            with self._guard:
                if self.lost is None:
                    self.lost = self._refresh()
                    if self.lost is not None:
                        self.on_lost(self.lost)
                if self.lost is not None:
                    return

    def _refresh(self) -> str | None:
        """Writes a new heartbeat if the lock is still ours; else returns why it is not."""
        try:
            generation = _replace_lock(self.path, {**self.content, "heartbeat": time.time()}, self.generation)
            if generation is None:
                return describe_loss(self.path, _read_lock(self.path))
        except Exception as error:  # pylint: disable=broad-except  # a missed beat only makes the lock look older
            logging.warning("could not refresh %s: %s", self.path, error)
            return None
        self.generation = generation
        return None

    def check(self) -> None:
        """Raises LockLost unless run.lock is still this run's; call it before writing into the model_dir.

        A run paused for long (Ctrl-Z, a suspended machine) may resume in the main thread before its
        heartbeat notices that a run on another host took the lock: this check reads the lock itself.
        """
        with self._guard:
            if self.lost is None:
                try:
                    holder = _read_lock(self.path)
                # Unreadable for now is not taken: the heartbeat goes on checking.
                except Exception as error:  # pylint: disable=broad-except
                    logging.warning("could not check %s: %s", self.path, error)
                    return
                if holder.get("token") != self.content["token"]:
                    self.lost = describe_loss(self.path, holder)
            if self.lost is not None:
                raise LockLost(self.lost)

    def release(self) -> None:
        """Stops the heartbeat and removes run.lock, only if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        _remove_own_lock(self.path, self.content["token"])


def describe_loss(path: str, holder: dict) -> str:
    """The one-line message of a run that lost its lock to `holder` (what the lock holds now; {} if gone)."""
    model_dir = os.path.dirname(path.rstrip("/"))
    stop = "this run stops without writing more"
    if not holder:
        return f"--model_dir {model_dir!r}: this run's {LOCK_FILE} was removed while it ran; {stop} (rerun to resume)"
    return (
        f"--model_dir {model_dir!r} was taken over by another run (host {holder.get('host')!r}, pid "
        f"{holder.get('pid')}) while this one was paused or out of touch; {stop}: let that run finish, or stop it "
        "and rerun this command to resume"
    )


def acquire_lock(model_dir: str, *, on_lost: Callable[[str], None] = stop_process) -> Lock:
    """Creates model_dir if needed and takes its run.lock.

    Args:
        on_lost: called from the heartbeat thread with a one-line message if the lock is taken from this run;
            by default it prints the message and ends the process (tests pass their own).

    Raises:
        RunDirError: another live run holds the lock (the message says how to clear it if it is dead).
    """
    if not model_dir.startswith("gs://"):  # Cloud Storage has no folders to check or create
        if tf.io.gfile.exists(model_dir) and not tf.io.gfile.isdir(model_dir):
            raise RunDirError(f"--model_dir {model_dir!r} is a file; pass a folder (new, or of an earlier run to resume)")
        tf.io.gfile.makedirs(model_dir)
    path = tf.io.gfile.join(model_dir, LOCK_FILE)
    content = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _process_start(os.getpid()),
               "token": uuid.uuid4().hex, "started": time.time()}
    for _ in range(2):
        generation = _create_lock(path, {**content, "heartbeat": time.time()})
        if generation is not None:
            lock = Lock(path=path, content=content, generation=generation, on_lost=on_lost)
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
    """Why a lock's holder is known dead, or None while it may be alive.

    On this host the process table decides, whatever the heartbeat says: a live process may be paused
    (Ctrl-Z, a suspended laptop, a stopped container, a long GC pause) and will resume writing. Elsewhere
    only the heartbeat can tell: older than STALE_SECONDS, its machine is taken for gone.
    """
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if not _process_alive(pid):
            return f"process {pid} on this host has exited"
        # A restarted container keeps its host name and reuses pids: the start time tells its processes apart.
        if holder.get("pid_started") and _process_start(pid) not in (None, holder["pid_started"]):
            return f"process {pid} on this host has exited (its pid now belongs to another process)"
        return None
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > STALE_SECONDS:
        return f"its heartbeat is {age:.0f} s old (host {holder.get('host')!r}, pid {holder.get('pid')})"
    return None


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # a stopped (SIGSTOP, Ctrl-Z) process is alive too
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_start(pid: int) -> str | None:
    """When a process started, in clock ticks since boot (Linux's /proc/<pid>/stat); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as file:
            # The command name (field 2) may hold spaces: count the fields after its closing parenthesis.
            return file.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


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
    # Only one rerun can rename the lock away. It may no longer be the one judged stale (another rerun took
    # it over meanwhile): that one is put back unless a third run created a lock in its place (then the one
    # put aside finds it is no longer its own at its next check, and stops).
    aside = f"{path}.stale-{uuid.uuid4().hex}"
    try:
        tf.io.gfile.rename(path, aside)
    except tf.errors.NotFoundError:
        return
    with tf.io.gfile.GFile(aside, "r") as file:
        text = file.read()
    if _parse_lock(text, modified=tf.io.gfile.stat(aside).mtime_nsec / 1e9) != holder:
        _create_lock_file(path, text)
    tf.io.gfile.remove(aside)


def _remove_own_lock(path: str, token: str) -> None:
    """Removes run.lock if it is still this run's (its token; on gs://, the generation just read too)."""
    holder = _read_lock(path)
    if holder.get("token") != token:
        return
    if path.startswith("gs://"):
        from google.api_core import exceptions

        try:
            _gcs_blob(path).delete(if_generation_match=holder["_generation"])
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            pass
        return
    # Files have no compare-and-delete: a run that took the lock between the read and the remove would lose
    # it (and stop at its next check). Only a run on another host can take a live run's lock, and only after
    # STALE_SECONDS without a heartbeat.
    tf.io.gfile.remove(path)


def _create_lock(path: str, content: dict) -> int | None:
    """Creates the lock only if absent; returns its generation (on gs://; 0 elsewhere), None if it existed."""
    text = json.dumps(content) + "\n"
    if path.startswith("gs://"):
        return _write_gcs_lock(path, text, generation=0)
    return 0 if _create_lock_file(path, text) else None


def _create_lock_file(path: str, text: str) -> bool:
    """Writes a local (or ram://, hdfs://) lock file only if absent; False when it existed."""
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


def _replace_lock(path: str, content: dict, generation: int) -> int | None:
    """A heartbeat: rewrites the lock if it is still ours; returns its new generation, None if it is not ours."""
    text = json.dumps(content) + "\n"
    if path.startswith("gs://"):
        return _write_gcs_lock(path, text, generation=generation)
    # Files have no compare-and-swap: read, then replace. The window is a few milliseconds, and only a run on
    # another host can take a live run's lock, after STALE_SECONDS without a heartbeat.
    if _read_lock(path).get("token") != content["token"]:
        return None
    schema.write_text(path, text)  # replaced whole (rename): a reader never sees it half-written
    return 0


def _gcs_blob(path: str):
    # Imported here: only gs:// model_dirs need the client (it honours STORAGE_EMULATOR_HOST). TensorFlow's
    # gs:// file system has no create-if-absent, so the lock goes through Cloud Storage's own API.
    from google.cloud import storage

    bucket_name, _, name = path[len("gs://"):].partition("/")
    return storage.Client().bucket(bucket_name).blob(name)


def _write_gcs_lock(path: str, text: str, *, generation: int) -> int | None:
    """Writes the lock object only if its generation is `generation` (0: absent); returns the new one, or None."""
    from google.api_core import exceptions

    blob = _gcs_blob(path)
    try:
        # Generation 0 means "no live object": the create succeeds for exactly one writer. A heartbeat names
        # the generation it last wrote, so a lock another run took meanwhile is detected, not overwritten.
        blob.upload_from_string(text, if_generation_match=generation)
    except exceptions.PreconditionFailed:
        return None
    return blob.generation
