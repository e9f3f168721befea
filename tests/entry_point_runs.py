"""Many runs of one entry point in one process: its real flags, checks and exit codes, one interpreter start.

A subprocess of a real command costs about 5 s on two cores, nearly all of it importing TensorFlow. A test of bad
input needs the entry point's own flag parsing, checks, messages and exit code, not a new interpreter each time:
`run_each` starts one process per entry point and calls its `run()` (what `python -m` calls) once per argument
list, with sys.argv set and absl's flags reset to their defaults in between. Each run's exit code, stdout and stderr
come back as a subprocess.CompletedProcess, as `subprocess.run` would give them (Keras' global state is cleared
between runs; messages that bypass Python, from TensorFlow's C++ logging, are not captured). An exception that escapes `run()`
is printed as a traceback with exit code 1, as the interpreter would. TensorFlow's devices are shared by the runs:
a run that splits the CPU (--num_cpu_devices) must come first. Tests that need a process of their own (a kill, a
signal, a crash of the interpreter) keep running the real command.
"""

import contextlib
import gc
import importlib
import io
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_each(module: str, argument_lists: list[list[str]], timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """Runs `python -m module *arguments` for each argument list, all in one new process; returns their results."""
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO_ROOT)}
    with tempfile.TemporaryDirectory(prefix="entry_point_runs_") as folder:
        request, results = Path(folder) / "request.json", Path(folder) / "results.json"
        request.write_text(json.dumps({"module": module, "runs": argument_lists}))
        driver = subprocess.run(
            [sys.executable, "-m", "tests.entry_point_runs", str(request), str(results)], cwd=REPO_ROOT,
            env=environment, capture_output=True, text=True, timeout=timeout,
        )
        if driver.returncode != 0 or not results.exists():
            raise AssertionError(f"the runs of {module} did not finish ({driver.returncode}):\n{driver.stderr[-4000:]}")
        outcomes = json.loads(results.read_text())
    return [
        subprocess.CompletedProcess([module, *arguments], outcome["returncode"], outcome["stdout"], outcome["stderr"])
        for arguments, outcome in zip(argument_lists, outcomes)
    ]


def _run_once(entry_point, module: str, arguments: list[str]) -> dict:
    from absl import app
    from absl import flags
    from absl import logging

    # Each run starts as a new process would: flags at their defaults, absl's start-up (which sets the log level
    # from the flags) done again.
    flags.FLAGS.unparse_flags()
    # run() froze the heap (cli.frozen_heap): what the run before left is garbage to collect now.
    gc.unfreeze()
    gc.collect()
    if "keras" in sys.modules:  # no model, layer name or precision policy left from the run before
        sys.modules["keras"].backend.clear_session()
        sys.modules["keras"].mixed_precision.set_global_policy("float32")
    app._run_init.done = False  # noqa: SLF001 - absl keeps no public way to run twice as if new
    app._register_and_parse_flags_with_usage.done = False  # noqa: SLF001
    sys.argv = [module, *arguments]
    stdout, stderr = io.StringIO(), io.StringIO()
    # absl's log handler holds the stream it was made with: point it at this run's stderr too.
    handler = logging.get_absl_handler().python_handler
    saved_stream = handler.stream
    handler.stream = stderr
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            returncode = _exit_code(entry_point)
    finally:
        handler.stream = saved_stream
    return {"returncode": returncode, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def _exit_code(entry_point) -> int:
    """The exit code of entry_point.run(), as the interpreter would give it."""
    try:
        entry_point.run()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)  # sys.exit("message"): the interpreter prints it, exit code 1
        return 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        return 1
    return 0


def main() -> None:
    request_path, results_path = sys.argv[1:3]
    request = json.loads(Path(request_path).read_text())
    entry_point = importlib.import_module(request["module"])
    outcomes = [_run_once(entry_point, request["module"], arguments) for arguments in request["runs"]]
    Path(results_path).write_text(json.dumps(outcomes))


if __name__ == "__main__":
    main()
