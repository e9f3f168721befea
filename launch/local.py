"""Runs the trainer as N MultiWorkerMirroredStrategy workers on this machine (127.0.0.1).

    python -m launch.local --num_workers=2 -- --data_dir=/tmp/demo_tfrecords --model_dir=/tmp/demo_model_mw \
        --backbone=mobilenet_v2 --weights=none --image_size=96 --epochs=2 --fine_tune_epochs=1

Everything after `--` is passed verbatim to every `python -m trainer.train`; the launcher adds
`--strategy=multi_worker` (and refuses another --strategy), picks free ports on 127.0.0.1 and gives worker i
TF_CONFIG {"cluster": {"worker": [...]}, "task": {"type": "worker", "index": i}}. Worker 0 is the chief: it
writes the outputs and prints the test accuracy. Each worker's output lines are prefixed `[worker i]`.

Workers die with the launcher: if it is killed outright (SIGKILL), the kernel kills them too (Linux), so
no orphan keeps writing the --model_dir. SIGTERM and SIGINT (Ctrl-C) are forwarded to the workers as SIGTERM, so each one finishes its step, saves a
checkpoint and exits 75; a second signal kills them. When a worker fails, the others (which would wait on it
forever) are stopped the same way. Exit code: 0 if every worker succeeded; 75 (rerun the same command to
resume) if the workers were preempted; otherwise the first failing worker's code (128+N for signal N).
`--dry_run` prints each worker's command line instead of running it.
"""

import ctypes
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

from launch import trainer_args

FLAGS = flags.FLAGS

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
TRAINER_MODULE = "trainer.train"
# After the workers exit, their output is copied until end of file; this bounds the wait only for a process the
# worker left behind that still holds its stdout or stderr open. Generous: a loaded machine may take a while to
# copy the last lines, and cutting them off would lose the reason a worker failed.
OUTPUT_DRAIN_SECONDS = 60


def define_flags() -> None:
    """Defines this program's flags; called by run(), not at import (other launchers share names)."""
    flags.DEFINE_integer("num_workers", 2, "Worker processes to start (at least 1); worker 0 is the chief.")
    flags.DEFINE_integer(
        "grace_period_seconds", 120,
        "After forwarding SIGTERM (or after a worker failed), wait this long for the workers to checkpoint and "
        "exit before killing them.",
    )
    flags.DEFINE_bool("dry_run", False, "Print each worker's TF_CONFIG and command line, start nothing.")


def pick_free_ports(count: int, host: str = HOST) -> list[int]:
    """count distinct TCP ports that are free on host now (the OS picks them; another program could still
    take one before the workers bind it, which then fails a worker visibly)."""
    sockets = []
    try:
        for _ in range(count):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind((host, 0))
            sockets.append(listener)
        return [listener.getsockname()[1] for listener in sockets]
    finally:
        for listener in sockets:
            listener.close()


def make_tf_config(*, workers: list[str], index: int) -> dict:
    """TF_CONFIG of worker `index` in a cluster of `workers` (host:port strings)."""
    assert 0 <= index < len(workers), (index, workers)
    return {"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}}


def make_worker_commands(*, num_workers: int, trainer_flags: list[str], ports: list[int],
                         python: str = sys.executable) -> list[tuple[dict, list[str]]]:
    """(TF_CONFIG, argument list) for each worker.

    Raises:
        ValueError: num_workers < 1, or trainer_flags set another --strategy.
    """
    if num_workers < 1:
        raise ValueError(f"--num_workers {num_workers} must be at least 1")
    assert len(ports) == num_workers, (ports, num_workers)
    arguments = trainer_args.with_flag(trainer_flags, "strategy", "multi_worker")
    workers = [f"{HOST}:{port}" for port in ports]
    command = [python, "-m", TRAINER_MODULE, *arguments]
    return [(make_tf_config(workers=workers, index=index), command) for index in range(num_workers)]


def combine_exit_codes(codes: list[int], *, stopped_by_launcher: bool) -> int:
    """The launcher's exit code from the workers' codes in the order they exited.

    0 if all are 0. 75 if the first failure is a preemption (75), or if the launcher was signalled and a
    worker reports 75: rerunning resumes. Otherwise the first non-zero code: a worker stopped because another
    failed must not turn a real failure into a retry. A negative code (killed by signal N) becomes 128+N.
    """
    failures = [128 - code if code < 0 else code for code in codes if code != 0]
    if not failures:
        return 0
    preempted = trainer_args.PREEMPTED_EXIT_CODE
    if failures[0] == preempted or (stopped_by_launcher and preempted in failures):
        return preempted
    return failures[0]


def die_with_parent() -> None:
    """In a worker, before it runs: have the kernel SIGKILL it when the launcher dies (Linux).

    A launcher killed with SIGKILL cannot forward anything, and its workers would run on as orphans that a
    rerun then races on the same --model_dir. PR_SET_PDEATHSIG fires when the parent thread exits; the
    launcher starts the workers from its main thread, which lives as long as the launcher.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _stream(source, destination, prefix: str, lock: threading.Lock) -> None:
    """Copies source's lines to destination, each prefixed, whole lines at a time."""
    for line in iter(source.readline, b""):
        with lock:
            destination.write(prefix + line.decode("utf-8", errors="replace"))
            destination.flush()
    source.close()


def run_workers(*, workers: list[tuple[dict, list[str]]], grace_period_seconds: float,
                cwd: str | None = None, environment: dict | None = None) -> int:
    """Starts the workers, streams their output, forwards SIGTERM/SIGINT, waits; returns the exit code.

    Args:
        workers: from make_worker_commands.
        grace_period_seconds: how long stopped workers get to checkpoint before SIGKILL.
        cwd, environment: of the worker processes (default: this process's).
    """
    base_environment = dict(os.environ if environment is None else environment)
    lock = threading.Lock()
    processes, threads = [], []
    for index, (tf_config, command) in enumerate(workers):
        process = subprocess.Popen(
            command, cwd=cwd, env={**base_environment, "TF_CONFIG": json.dumps(tf_config)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # Own session: a terminal's Ctrl-C reaches only the launcher, which turns it into SIGTERM.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        processes.append(process)
        for source, destination in ((process.stdout, sys.stdout), (process.stderr, sys.stderr)):
            thread = threading.Thread(target=_stream, args=(source, destination, f"[worker {index}] ", lock), daemon=True)
            thread.start()
            threads.append(thread)

    state = {"stop_requested_at": None, "signalled": False, "killed": False}

    def stop(kill: bool) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        if kill:
            state["killed"] = True
        elif state["stop_requested_at"] is None:
            state["stop_requested_at"] = time.monotonic()

    def handle(signal_number, frame) -> None:
        del frame
        already = state["signalled"]
        state["signalled"] = True
        print(f"launch.local: {signal.Signals(signal_number).name}: "
              f"{'killing' if already else 'stopping (SIGTERM)'} the workers", file=sys.stderr)
        stop(kill=already)

    previous = {number: signal.signal(number, handle) for number in (signal.SIGTERM, signal.SIGINT)}
    codes: list[int] = []
    finished: set[int] = set()
    try:
        while len(finished) < len(processes):
            for index, process in enumerate(processes):
                if index not in finished and process.poll() is not None:
                    finished.add(index)
                    codes.append(process.returncode)
                    if process.returncode != 0 and state["stop_requested_at"] is None:
                        print(f"launch.local: worker {index} exited with {process.returncode}; stopping the others",
                              file=sys.stderr)
                        stop(kill=False)
            started = state["stop_requested_at"]
            if started is not None and not state["killed"] and time.monotonic() - started > grace_period_seconds:
                print(f"launch.local: workers still running {grace_period_seconds}s after SIGTERM; killing them",
                      file=sys.stderr)
                stop(kill=True)
            time.sleep(0.2)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        drained_by = time.monotonic() + OUTPUT_DRAIN_SECONDS
        for thread in threads:
            thread.join(timeout=max(0.0, drained_by - time.monotonic()))
    return combine_exit_codes(codes, stopped_by_launcher=state["signalled"])


def describe(workers: list[tuple[dict, list[str]]]) -> str:
    """The workers as shell lines (for --dry_run): `TF_CONFIG='...' python -m trainer.train ...`."""
    # The assignment word stays unquoted (a quoted one would not be an assignment); its value is quoted.
    return "\n".join(
        f"TF_CONFIG={shlex.quote(json.dumps(tf_config))} {shlex.join(command)}" for tf_config, command in workers
    )


def main(argv: list[str]) -> int:
    try:
        if FLAGS.grace_period_seconds < 0:
            raise ValueError(f"--grace_period_seconds {FLAGS.grace_period_seconds} must be >= 0")
        workers = make_worker_commands(
            num_workers=FLAGS.num_workers, trainer_flags=argv[1:], ports=pick_free_ports(max(FLAGS.num_workers, 0)),
        )
    except ValueError as error:
        trainer_args.fail(str(error))
    if FLAGS.dry_run:
        print(describe(workers))
        return 0
    return run_workers(workers=workers, grace_period_seconds=FLAGS.grace_period_seconds)


def run() -> None:
    """Entry point of `python -m launch.local` and of the `launch-local` console script."""
    define_flags()
    app.run(main, flags_parser=trainer_args.parse_flags)


if __name__ == "__main__":
    run()
