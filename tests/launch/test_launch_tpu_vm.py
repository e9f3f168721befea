"""launch/tpu_vm.py: the gcloud create / install / train commands, and that no trainer flag reaches a shell."""

import shlex
import subprocess
import sys
import types

import pytest

from launch import tpu_vm
from tests.conftest import REPO_ROOT

# Generous: a subprocess that starts Python on a loaded 2-core machine; the test never measures this.
SUBPROCESS_TIMEOUT_SECONDS = 300
WHEEL = "gs://bucket/staging/packages/imagefolder_transfer-0.1.0-py3-none-any.whl"
DEFAULTS = dict(
    name="flowers-tpu", zone="us-central2-b", project="my-project", accelerator_type="v4-32",
    version="tpu-ubuntu2204-base", spot=True, package=WHEEL, tensorflow_package="tensorflow-tpu==2.21.0",
    tensorflow_find_links=tpu_vm.LIBTPU_FIND_LINKS, trainer_flags=["--data_dir=gs://b/d", "--model_dir=gs://b/m"],
    create=True, install=True,
)


def remote_command(ssh_command):
    (option,) = [arg for arg in ssh_command if arg.startswith("--command=")]
    return option[len("--command="):]


def test_check_the_wheel_then_create_install_and_train_on_every_host():
    check, create, install, train = tpu_vm.make_commands(**DEFAULTS)
    assert check == ["gcloud", "storage", "ls", WHEEL, "--project=my-project"]
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "flowers-tpu", "--zone=us-central2-b",
                      "--project=my-project", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]
    for ssh in (install, train):
        assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "flowers-tpu", "--zone=us-central2-b"]
        assert "--worker=all" in ssh
    steps = [shlex.split(step) for step in remote_command(install).split(" && ")]
    assert ["gcloud", "storage", "cp", WHEEL, f"{tpu_vm.REMOTE_WHEEL_DIR}/{WHEEL.rsplit('/', 1)[1]}"] in steps
    assert steps[-1][:5] == ["python3", "-m", "pip", "install", "tensorflow-tpu==2.21.0"]
    assert shlex.split(remote_command(train)) == [
        "python3", "-m", "trainer.train", "--data_dir=gs://b/d", "--model_dir=gs://b/m",
        "--strategy=tpu", "--tpu=local", "--precision=mixed_bfloat16",
    ]


def test_existing_vm_with_a_pip_requirement():
    commands = tpu_vm.make_commands(**{**DEFAULTS, "create": False, "package": "imagefolder-transfer==0.1.0",
                                       "tensorflow_package": ""})
    install, _ = commands
    assert remote_command(install) == "python3 -m pip install --upgrade imagefolder-transfer==0.1.0"


def test_trainer_flags_are_quoted_for_the_remote_shell():
    hostile = ["--model_dir=gs://b/m; rm -rf ~", "--data_dir=$(reboot)", "--backbone=`id`"]
    *_, train = tpu_vm.make_commands(**{**DEFAULTS, "trainer_flags": hostile})
    assert shlex.split(remote_command(train))[3:6] == hostile
    # A real POSIX shell sees the same words.
    words = subprocess.run(["sh", "-c", "printf '%s\\n' " + remote_command(train)[len("python3 -m trainer.train "):]],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert words[:3] == hostile


@pytest.mark.parametrize("changes, message", [
    (dict(name="Flowers"), "--name 'Flowers' must be"),
    (dict(zone="us-central2"), "--zone 'us-central2' is not a zone"),
    (dict(accelerator_type="v4_8"), "--accelerator_type 'v4_8' is not a TPU type"),
    (dict(package="gs://b/pkg.tar.gz"), "must be a wheel"),
    (dict(package="a b"), "--package 'a b' must be"),
    (dict(version="x;y"), "--version 'x;y'"),
    (dict(trainer_flags=["--tpu=my-tpu"]), "trainer flag --tpu=my-tpu conflicts"),
])
def test_invalid_flags_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        tpu_vm.make_commands(**{**DEFAULTS, **changes})


def test_dry_run_cli():
    result = subprocess.run(
        [sys.executable, "-m", "launch.tpu_vm", "--name=flowers-tpu", "--zone=us-central2-b", f"--package={WHEEL}",
         "--dry_run", "--", "--data_dir=gs://b/d", "--model_dir=gs://b/m"],
        cwd=REPO_ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT)}, timeout=SUBPROCESS_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert shlex.split(lines[0]) == ["gcloud", "storage", "ls", WHEEL]
    assert shlex.split(lines[1])[4] == "create"
    assert remote_command(shlex.split(lines[3])).endswith("--strategy=tpu --tpu=local --precision=mixed_bfloat16")
    missing = subprocess.run([sys.executable, "-m", "launch.tpu_vm", "--zone=us-central2-b", "--dry_run"], cwd=REPO_ROOT,
                             capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT)},
                             timeout=SUBPROCESS_TIMEOUT_SECONDS)
    assert missing.returncode == 2 and missing.stderr == "error: --name None must be 1-63 lowercase letters, digits or hyphens, starting with a letter\n"


@pytest.mark.parametrize("changes", [
    dict(package="imagefolder-transfer==0.1.0"),  # a pip requirement: nothing on gs:// to check
    dict(package="git+https://github.com/me/imagefolder-transfer"),
    dict(install=False),  # nothing is copied
])
def test_no_wheel_check_without_a_gs_wheel_to_install(changes):
    commands = tpu_vm.make_commands(**{**DEFAULTS, **changes})
    assert commands[0][4] == "create"


FAKE_GCLOUD = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE_GCLOUD_LOG"
if [ "$1 $2" = "storage ls" ] && [ -n "$FAKE_GCLOUD_NO_SUCH_OBJECT" ]; then
    echo "ERROR: (gcloud.storage.ls) One or more URLs matched no objects." >&2
    exit 1
fi
"""


def run_with_fake_gcloud(tmp_path, *, no_such_object: bool) -> tuple[subprocess.CompletedProcess, list[str]]:
    """launch.tpu_vm (not a dry run) with a stand-in `gcloud` that logs each call; (result, the calls' arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud.log"
    environment = {"PYTHONPATH": str(REPO_ROOT), "PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_GCLOUD_LOG": str(log),
                   **({"FAKE_GCLOUD_NO_SUCH_OBJECT": "1"} if no_such_object else {})}
    result = subprocess.run(
        [sys.executable, "-m", "launch.tpu_vm", "--name=flowers-tpu", "--zone=us-central2-b", f"--package={WHEEL}",
         "--", "--data_dir=gs://b/d", "--model_dir=gs://b/m"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=environment, timeout=SUBPROCESS_TIMEOUT_SECONDS,
    )
    return result, log.read_text().splitlines() if log.exists() else []


def test_a_missing_gs_wheel_stops_the_launch_before_the_tpu_vm_is_created(tmp_path):
    # Before: `tpu-vm create` (a billed TPU) ran first; the missing wheel was found by the install step after it.
    result, calls = run_with_fake_gcloud(tmp_path, no_such_object=True)
    assert result.returncode == 1
    assert calls == [f"storage ls {WHEEL}"]
    assert "matched no objects" in result.stderr


def test_the_gs_wheel_is_checked_first_then_create_install_and_train_run(tmp_path):
    result, calls = run_with_fake_gcloud(tmp_path, no_such_object=False)
    assert result.returncode == 0, result.stderr
    assert [call.split()[:5] for call in calls] == [
        ["storage", "ls", WHEEL], ["compute", "tpus", "tpu-vm", "create", "flowers-tpu"],
        ["compute", "tpus", "tpu-vm", "ssh", "flowers-tpu"], ["compute", "tpus", "tpu-vm", "ssh", "flowers-tpu"],
    ]


def never_run_a_tool(command, **kwargs):
    raise AssertionError(f"{command[:5]} was run before the local inputs were checked")


def run_main(monkeypatch, capsys, **flag_values) -> tuple[int, str]:
    """tpu_vm.main with these flag values and a run_tool that fails the test; (exit code, stderr)."""
    flag_values = {"name": "flowers-tpu", "zone": "us-central2-b", "project": "", "accelerator_type": "v4-8",
                   "version": "tpu-ubuntu2204-base", "spot": False, "package": WHEEL,
                   "tensorflow_package": "tensorflow-tpu==2.21.0", "tensorflow_find_links": tpu_vm.LIBTPU_FIND_LINKS,
                   "create": True, "install": True, "dry_run": False, **flag_values}
    monkeypatch.setattr(tpu_vm, "FLAGS", types.SimpleNamespace(**flag_values))
    monkeypatch.setattr(tpu_vm.trainer_args, "run_tool", never_run_a_tool)
    with pytest.raises(SystemExit) as exit_info:
        tpu_vm.main(["launch.tpu_vm", "--data_dir=gs://b/d"])
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("package, exists", [
    ("dist/imagefolder_transfer-0.1.0-py3-none-any.whl", False),  # a typo or a wheel never built
    ("imagefolder_transfer-0.1.0-py3-none-any.whl", False),
    ("./dist", False),
    ("~/wheels/imagefolder_transfer-0.1.0-py3-none-any.whl", False),
    ("file:///tmp/no/such.whl", False),
    ("LOCAL_WHEEL", True),  # even a wheel that exists here: the TPU VM's hosts cannot read it
])
def test_a_local_package_path_is_refused_before_any_gcloud_command(monkeypatch, capsys, tmp_path, package, exists):
    # Before: the path went to `pip install` on the TPU VM's hosts, after `tpu-vm create` had made a billed TPU.
    if package == "LOCAL_WHEEL":
        package = str(tmp_path / "imagefolder_transfer-0.1.0-py3-none-any.whl")
        open(package, "w").close()
    code, stderr = run_main(monkeypatch, capsys, package=package)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"error: --package {package!r} is a path on this machine"), stderr
    assert ("does not exist here" in stderr) == (not exists)
    assert "python -m launch.staging" in stderr


def test_a_local_package_path_is_fine_with_noinstall(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(tpu_vm, "FLAGS", types.SimpleNamespace(
        name="flowers-tpu", zone="us-central2-b", project="", accelerator_type="v4-8", version="tpu-ubuntu2204-base",
        spot=False, package="dist/no-such.whl", tensorflow_package="", tensorflow_find_links="", create=False,
        install=False, dry_run=False))
    monkeypatch.setattr(tpu_vm.trainer_args, "run_tool", lambda command, **kwargs: calls.append(command) or 0)
    assert tpu_vm.main(["launch.tpu_vm"]) == 0
    assert [command[4] for command in calls] == ["ssh"]
