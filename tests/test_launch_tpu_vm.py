"""launch/tpu_vm.py: the gcloud create / install / train commands, and that no trainer flag reaches a shell."""

import shlex
import subprocess
import sys

import pytest

from launch import tpu_vm
from tests.conftest import REPO_ROOT

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


def test_create_install_and_train_on_every_host():
    create, install, train = tpu_vm.make_commands(**DEFAULTS)
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
    _, _, train = tpu_vm.make_commands(**{**DEFAULTS, "trainer_flags": hostile})
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
        cwd=REPO_ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT)}, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert shlex.split(lines[0])[4] == "create"
    assert remote_command(shlex.split(lines[2])).endswith("--strategy=tpu --tpu=local --precision=mixed_bfloat16")
    missing = subprocess.run([sys.executable, "-m", "launch.tpu_vm", "--zone=us-central2-b", "--dry_run"], cwd=REPO_ROOT,
                             capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT)}, timeout=60)
    assert missing.returncode == 2 and missing.stderr == "error: --name None must be 1-63 lowercase letters, digits or hyphens, starting with a letter\n"
