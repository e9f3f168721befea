"""The trainer's flags as a launcher sees them: passed through verbatim, with a few flags it must set.

    trainer_args.with_flag(["--data_dir=gs://b/data"], "strategy", "multi_worker")
    # -> ["--data_dir=gs://b/data", "--strategy=multi_worker"]

A launcher never imports `trainer` (it may run where TensorFlow is not installed). It knows only the
handful of flags whose values follow from the target (--strategy, --tpu, --precision): it adds them
when absent and refuses a conflicting value, and leaves every other flag untouched. A value hidden in a
--flagfile is not seen here; the trainer then uses whichever comes last on its command line.

Also the command-line boundary shared by the launchers' entry modules: absl flag errors become one
`error: ...` line with exit code 2, and run_tool runs a cloud CLI (gcloud, kubectl).
"""

import subprocess
import sys

from absl import flags

USAGE_EXIT_CODE = 2  # bad flags, as the trainer uses it
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the trainer saved a checkpoint after SIGTERM; rerun to resume


def flag_value(args: list[str], name: str) -> str | None:
    """The value of `--name` in args (`--name=v`, `-name=v` or `--name v`), the last one wins; None if absent."""
    value = None
    for position, arg in enumerate(args):
        if arg == "--":
            break
        for prefix in (f"--{name}", f"-{name}"):
            if arg.startswith(prefix + "="):
                value = arg[len(prefix) + 1:]
            elif arg == prefix and position + 1 < len(args):
                value = args[position + 1]
    return value


def with_flag(args: list[str], name: str, value: str) -> list[str]:
    """args plus `--name=value`, unless args already set it to value.

    Raises:
        ValueError: args set --name to another value.
    """
    current = flag_value(args, name)
    if current is None:
        return [*args, f"--{name}={value}"]
    if current != value:
        raise ValueError(
            f"trainer flag --{name}={current} conflicts with this launcher, which runs --{name}={value}; "
            f"drop it or set it to {value}"
        )
    return list(args)


def with_default_flag(args: list[str], name: str, value: str) -> list[str]:
    """args plus `--name=value` when args do not set --name (any value the user gave is kept)."""
    return list(args) if flag_value(args, name) is not None else [*args, f"--{name}={value}"]


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flags_parser for the launchers: a one-line `error: ...` and exit code 2 on a bad flag.

    Returns:
        argv[0] followed by the arguments after `--` (the trainer's flags) and any other non-flag arguments.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        hint = " (trainer flags go after `--`)" if "Unknown command line flag" in str(error) else ""
        fail(f"{error}{hint}")


def fail(message: str) -> None:
    """Prints `error: <message>` on stderr and exits with code 2 (bad flags)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def require(value, flag_name: str) -> None:
    """Exits with `error: --<flag_name> is required` when value is empty."""
    if value in (None, "", []):
        fail(f"--{flag_name} is required")


def run_tool(command: list[str], *, install_hint: str, input_text: str | None = None) -> int:
    """Runs a CLI tool from an argument list (never a shell) and returns its exit code.

    A missing tool is one `error: <tool> not found; <install_hint> or use --dry_run` line and code 1.
    """
    try:
        return subprocess.run(command, input=input_text, text=input_text is not None, check=False).returncode
    except FileNotFoundError:
        print(f"error: {command[0]} not found; {install_hint} or use --dry_run", file=sys.stderr)
        return 1
