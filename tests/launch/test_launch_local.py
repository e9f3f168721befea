"""launch/local.py: TF_CONFIG and commands, exit codes, signal forwarding (with stand-in workers), and one real
two-worker training run on tiny data."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from launch import local
from tests.conftest import REPO_ROOT

# Generous: how long a subprocess (or a stand-in worker) may take to start on a loaded 2-core machine. Every wait
# bounded by it ends as soon as what it waits for happens; no test measures it.
SUBPROCESS_TIMEOUT_SECONDS = 300


def test_tf_config_and_commands():
    workers = local.make_worker_commands(num_workers=2, trainer_flags=["--data_dir=d"], ports=[1001, 1002], python="py")
    assert [tf_config for tf_config, _ in workers] == [
        {"cluster": {"worker": ["127.0.0.1:1001", "127.0.0.1:1002"]}, "task": {"type": "worker", "index": index}}
        for index in (0, 1)
    ]
    assert workers[0][1] == workers[1][1] == ["py", "-m", "trainer.train", "--data_dir=d", "--strategy=multi_worker"]
    kept = local.make_worker_commands(num_workers=1, trainer_flags=["--strategy", "multi_worker"], ports=[1], python="py")
    assert kept[0][1] == ["py", "-m", "trainer.train", "--strategy", "multi_worker"]


@pytest.mark.parametrize("num_workers, flags, message", [
    (0, [], "--num_workers 0 must be at least 1"),
    (2, ["--strategy=mirrored"], "trainer flag --strategy=mirrored conflicts"),
])
def test_invalid_arguments(num_workers, flags, message):
    with pytest.raises(ValueError, match=message):
        local.make_worker_commands(num_workers=num_workers, trainer_flags=flags, ports=[1] * max(num_workers, 0))


def test_free_ports_are_distinct():
    ports = local.pick_free_ports(4)
    assert len(set(ports)) == 4 and all(port > 0 for port in ports)


@pytest.mark.parametrize("codes, signalled, expected", [
    ([0, 0], False, 0),
    ([75, 75], True, 75),
    ([75, 1], False, 75),      # preempted first: the other failed because of it
    ([1, 75], False, 1),       # a real failure stays one
    ([1, 75], True, 75),       # the launcher itself was stopped
    ([0, -9], False, 137),
    ([2, -15], False, 2),
])
def test_combine_exit_codes(codes, signalled, expected):
    assert local.combine_exit_codes(codes, stopped_by_launcher=signalled) == expected


# Stand-in worker: answers SIGTERM like the trainer, then says it is ready (a line, and a file named by its index
# in the folder argv[1]) and sleeps until the signal comes.
PREEMPTIBLE = f"""
import json, os, pathlib, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (print("checkpoint saved", flush=True), sys.exit(75)))
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
print("ready", index, flush=True)
pathlib.Path(sys.argv[1], str(index)).touch()
time.sleep({SUBPROCESS_TIMEOUT_SECONDS})
"""


def stand_ins(*scripts, arguments=()):
    """Workers that run these Python scripts (with arguments) instead of the trainer, with the trainer's TF_CONFIG."""
    workers = local.make_worker_commands(num_workers=len(scripts), trainer_flags=[], ports=list(range(1, len(scripts) + 1)))
    return [(tf_config, [sys.executable, "-c", script, *arguments]) for (tf_config, _), script in zip(workers, scripts)]


def signal_once_ready(ready_dir, count: int, signal_number: int) -> threading.Thread:
    """Sends signal_number to this process once `count` stand-ins wrote their ready file into ready_dir and
    run_workers handles the signal: when, not after how long (a loaded machine may start the workers slowly)."""
    handler_before = signal.getsignal(signal_number)

    def wait_then_signal():
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if len(os.listdir(ready_dir)) >= count and signal.getsignal(signal_number) is not handler_before:
                os.kill(os.getpid(), signal_number)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=wait_then_signal, daemon=True)
    thread.start()
    return thread


def test_sigterm_is_forwarded_and_preemption_exits_75(capfd, tmp_path):
    # Before: SIGTERM came after a fixed 3 s, which a loaded machine can reach before the workers handle it.
    signal_once_ready(tmp_path, 2, signal.SIGTERM)
    code = local.run_workers(workers=stand_ins(PREEMPTIBLE, PREEMPTIBLE, arguments=[str(tmp_path)]),
                             grace_period_seconds=SUBPROCESS_TIMEOUT_SECONDS)
    output = capfd.readouterr().out
    assert code == 75
    assert "[worker 0] ready 0" in output and "[worker 1] ready 1" in output
    assert output.count("checkpoint saved") == 2


def test_a_failed_worker_stops_the_others_and_its_code_wins(capfd, tmp_path):
    # The failing worker exits once the stuck one ignores SIGTERM (before: after a fixed 0.5 s, which a loaded
    # machine can reach first, and then SIGTERM ends the stuck worker and nothing is left to kill).
    stuck = (f"import pathlib, signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
             f"pathlib.Path(sys.argv[1], 'stuck').touch()\ntime.sleep({SUBPROCESS_TIMEOUT_SECONDS})\n")
    failing = (f"import pathlib, sys, time\ndeadline = time.monotonic() + {SUBPROCESS_TIMEOUT_SECONDS}\n"
               "while not pathlib.Path(sys.argv[1], 'stuck').exists() and time.monotonic() < deadline:\n"
               "    time.sleep(0.05)\nprint('bad input', file=sys.stderr)\nsys.exit(3)\n")
    code = local.run_workers(workers=stand_ins(stuck, failing, arguments=[str(tmp_path)]), grace_period_seconds=1)
    assert code == 3
    errors = capfd.readouterr().err
    assert "[worker 1] bad input" in errors and "worker 1 exited with 3" in errors and "killing them" in errors


LAUNCHER_OF_SLEEPERS = """
import sys
from launch import local
from tests.launch.test_launch_local import stand_ins
sleeper = "import os, pathlib, sys, time\\npathlib.Path(sys.argv[1]).write_text(str(os.getpid()))\\ntime.sleep(900)\\n"
workers = [(tf_config, command + [f"{sys.argv[1]}/{index}"]) for index, (tf_config, command) in enumerate(stand_ins(sleeper, sleeper))]
local.run_workers(workers=workers, grace_period_seconds=1)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_die_when_the_launcher_is_killed(tmp_path):
    # Before: kill -9 of the launcher left its workers running as orphans, racing a rerun on --model_dir.
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER_OF_SLEEPERS, str(tmp_path)], cwd=REPO_ROOT,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        deadline = time.time() + SUBPROCESS_TIMEOUT_SECONDS
        while len(list(tmp_path.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.1)
        pids = [int(path.read_text()) for path in tmp_path.iterdir()]
        assert len(pids) == 2
        launcher.kill()
        launcher.wait(timeout=SUBPROCESS_TIMEOUT_SECONDS)
        deadline = time.time() + SUBPROCESS_TIMEOUT_SECONDS
        while any(_alive(pid) for pid in pids) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids)
    finally:
        launcher.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of a dead parent is reaped by init; until then it is a zombie: not running.
    with open(f"/proc/{pid}/stat") as stat_file:
        return stat_file.read().split(") ")[1][0] != "Z"


def run_cli(*args, timeout=SUBPROCESS_TIMEOUT_SECONDS):
    return subprocess.run([sys.executable, "-m", "launch.local", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=timeout)


def test_dry_run_and_errors():
    result = run_cli("--num_workers=3", "--dry_run", "--", "--data_dir=/tmp/a b")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[2].startswith("TF_CONFIG='{") and lines[2].endswith("'--data_dir=/tmp/a b' --strategy=multi_worker")
    refused = run_cli("--", "--strategy=mirrored")
    assert refused.returncode == 2 and refused.stderr.startswith("error: trainer flag --strategy=mirrored conflicts")
    assert run_cli("--num_workers=-1").stderr == "error: --num_workers -1 must be at least 1\n"


def test_two_real_workers_train_in_sync(demo_data_dir, tmp_path):
    model_dir = tmp_path / "model"
    result = run_cli(
        "--num_workers=2", "--", f"--data_dir={demo_data_dir}", f"--model_dir={model_dir}", "--backbone=mobilenet_v2",
        "--weights=none", "--image_size=32", "--batch_size=8", "--epochs=1", "--fine_tune_epochs=1",
        "--steps_per_epoch=2", timeout=500,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (model_dir / "metrics.json").exists()
    assert json.loads((model_dir / "metrics.json").read_text())["num_replicas"] == 2
    fingerprints = dict(re.findall(r"\[worker (\d)\] .*weights fingerprint ([0-9a-f]+)", result.stderr))
    assert set(fingerprints) == {"0", "1"} and fingerprints["0"] == fingerprints["1"]
    assert re.search(r"^\[worker 0\] test accuracy", result.stdout, re.MULTILINE)
