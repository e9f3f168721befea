"""Creates a Cloud TPU VM (or pod slice), installs this package on every host and runs the trainer there.

    python -m launch.tpu_vm --name=flowers-tpu --zone=us-central2-b --project=my-project \
        --accelerator_type=v4-8 --version=tpu-ubuntu2204-base \
        --package=gs://my-bucket/staging/packages/imagefolder_transfer-0.1.0-py3-none-any.whl \
        --dry_run -- --data_dir=gs://my-bucket/flowers_tfrecords --model_dir=gs://my-bucket/flowers_tpu \
        --batch_size=1024

The gcloud commands, run in order, each only if the one before succeeded (`--dry_run` prints them):

0. `gcloud storage ls <package>` when the install step copies a gs:// wheel: a wrong or missing wheel stops the
   launch here, before a billed TPU VM exists;
1. `gcloud compute tpus tpu-vm create NAME ...` (skipped with --nocreate, for an existing TPU VM);
2. `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=<install>`: pip-installs --package (a wheel on
   gs://, staged by `python -m launch.staging`, copied with `gcloud storage cp`; or any pip requirement), then
   replaces the CPU `tensorflow` it pulled in with --tensorflow_package, the TPU build;
3. `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=<train>`: `python3 -m trainer.train` with the
   flags after `--` verbatim plus `--strategy=tpu --tpu=local` and `--precision=mixed_bfloat16` unless given.

--package is read on the TPU VM's hosts, so a path on this machine (which they cannot read) is refused before
anything runs: stage the wheel with `python -m launch.staging` and pass the gs:// path it prints.

The remote --command is a shell string by necessity; it is assembled with shlex.quote from validated parts, so
no trainer flag is ever interpreted by the remote shell. The training step exits 75 when the TPU VM is
preempted (the trainer saved a checkpoint): run this again with --nocreate --noinstall to resume.
"""

import os
import re
import shlex
import sys

from absl import app
from absl import flags

from launch import trainer_args

FLAGS = flags.FLAGS

NAME_PATTERN = r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?"
ZONE_PATTERN = r"[a-z]+-[a-z]+[0-9]+-[a-z]"
ACCELERATOR_PATTERN = r"v[0-9]+[a-z]*(litepod)?-[0-9]+"
REMOTE_WHEEL_DIR = "/tmp/imagefolder_transfer_wheel"
LIBTPU_FIND_LINKS = "https://storage.googleapis.com/libtpu-tf-releases/index.html"
LOCAL_ARCHIVE_SUFFIXES = (".whl", ".tar.gz", ".tgz", ".zip")  # what pip installs from a file


def define_flags() -> None:
    """Defines this program's flags; called by run(), not at import (other launchers share names)."""
    flags.DEFINE_string("name", None, "TPU VM name: lowercase letters, digits and hyphens.")
    flags.DEFINE_string("zone", None, "Zone with the TPU type, e.g. us-central2-b (v4), us-west4-a (v5e).")
    flags.DEFINE_string("project", "", "Google Cloud project ID; '' = gcloud's configured project.")
    flags.DEFINE_string("accelerator_type", "v4-8", "TPU type and size, e.g. v4-8 (one host), v4-32 (a 4-host pod slice), v5litepod-8.")
    flags.DEFINE_string("version", "tpu-ubuntu2204-base", "TPU VM software version (runtime image).")
    flags.DEFINE_bool("spot", False, "Create a Spot TPU VM (cheaper, preemptible).")
    flags.DEFINE_string(
        "package", None,
        "What to pip-install on every host: a gs://.../*.whl (from `python -m launch.staging`) or a pip requirement "
        "(e.g. imagefolder-transfer==0.1.0, or git+https://...); not a path on this machine, which the hosts cannot "
        "read.",
    )
    flags.DEFINE_string(
        "tensorflow_package", "tensorflow-tpu==2.21.0",
        "The TPU build of TensorFlow installed in place of the CPU one; '' keeps whatever is installed.",
    )
    flags.DEFINE_string("tensorflow_find_links", LIBTPU_FIND_LINKS, "pip --find-links for --tensorflow_package (libtpu wheels).")
    flags.DEFINE_bool("create", True, "Create the TPU VM first (--nocreate: it exists).")
    flags.DEFINE_bool("install", True, "Install the package first (--noinstall: it is installed).")
    flags.DEFINE_bool("dry_run", False, "Print the gcloud commands, run nothing.")


def check_names(*, name: str, zone: str, accelerator_type: str, project: str) -> None:
    """Raises ValueError naming the flag when a value is not a valid TPU name, zone, type or project."""
    if not re.fullmatch(NAME_PATTERN, name or ""):
        raise ValueError(f"--name {name!r} must be 1-63 lowercase letters, digits or hyphens, starting with a letter")
    if not re.fullmatch(ZONE_PATTERN, zone or ""):
        raise ValueError(f"--zone {zone!r} is not a zone name such as us-central2-b")
    if not re.fullmatch(ACCELERATOR_PATTERN, accelerator_type):
        raise ValueError(f"--accelerator_type {accelerator_type!r} is not a TPU type such as v4-8 or v5litepod-8")
    if project and not re.fullmatch(r"[a-z][-a-z0-9:.]{4,62}[a-z0-9]", project):
        raise ValueError(f"--project {project!r} is not a project ID")


def _gcloud_tpu(verb: str, name: str, zone: str, project: str) -> list[str]:
    command = ["gcloud", "compute", "tpus", "tpu-vm", verb, name, f"--zone={zone}"]
    return command + ([f"--project={project}"] if project else [])


def make_create_command(*, name: str, zone: str, project: str, accelerator_type: str, version: str, spot: bool) -> list[str]:
    """`gcloud compute tpus tpu-vm create` as an argument list."""
    if not re.fullmatch(r"[-a-z0-9.]+", version):
        raise ValueError(f"--version {version!r} is not a TPU software version such as tpu-ubuntu2204-base")
    command = _gcloud_tpu("create", name, zone, project) + [f"--accelerator-type={accelerator_type}", f"--version={version}"]
    return command + (["--spot"] if spot else [])


def is_local_path(package: str) -> bool:
    """Whether --package names a file or folder on this machine rather than a pip requirement or a URL."""
    if "file:" in package:
        return True
    if "://" in package:
        return False
    return ("/" in package or "\\" in package or package.startswith((".", "~"))
            or package.endswith(LOCAL_ARCHIVE_SUFFIXES))


def make_check_command(*, package: str, project: str) -> list[str]:
    """`gcloud storage ls` of a gs:// --package: run before create, it fails at once if the wheel is not there."""
    return ["gcloud", "storage", "ls", package] + ([f"--project={project}"] if project else [])


def make_install_script(*, package: str, tensorflow_package: str, tensorflow_find_links: str) -> str:
    """The remote shell command that installs the package (and the TPU TensorFlow) on one host."""
    if not package or any(character.isspace() for character in package):
        raise ValueError(f"--package {package!r} must be a gs://...whl path or one pip requirement")
    if is_local_path(package):
        exists = os.path.exists(os.path.expanduser(package.removeprefix("file://")))
        missing = "" if exists else " (it does not exist here either)"
        raise ValueError(
            f"--package {package!r} is a path on this machine{missing}, which the TPU VM's hosts cannot read: stage "
            "the wheel with `python -m launch.staging --staging_dir=gs://BUCKET/staging` and pass the gs://.../*.whl "
            "it prints"
        )
    steps = []
    if package.startswith("gs://"):
        if not package.endswith(".whl"):
            raise ValueError(f"--package {package!r} on gs:// must be a wheel (.whl), as `python -m launch.staging` uploads")
        wheel = f"{REMOTE_WHEEL_DIR}/{package.rsplit('/', 1)[1]}"
        steps.append(shlex.join(["mkdir", "-p", REMOTE_WHEEL_DIR]))
        steps.append(shlex.join(["gcloud", "storage", "cp", package, wheel]))
        package = wheel
    steps.append(shlex.join(["python3", "-m", "pip", "install", "--upgrade", package]))
    if tensorflow_package:
        # The package's `tensorflow` requirement installs the CPU build; the TPU build provides the same module.
        steps.append(shlex.join(["python3", "-m", "pip", "uninstall", "--yes", "tensorflow"]))
        steps.append(shlex.join(["python3", "-m", "pip", "install", tensorflow_package, "--find-links", tensorflow_find_links]))
    return " && ".join(steps)


def make_train_script(trainer_flags: list[str]) -> str:
    """The remote shell command that runs the trainer on one host, every argument quoted.

    Raises:
        ValueError: a trainer flag contradicts --strategy=tpu --tpu=local.
    """
    arguments = trainer_args.with_flag(trainer_flags, "strategy", "tpu")
    arguments = trainer_args.with_flag(arguments, "tpu", "local")
    arguments = trainer_args.with_default_flag(arguments, "precision", "mixed_bfloat16")
    return shlex.join(["python3", "-m", "trainer.train", *arguments])


def make_commands(
    *, name: str, zone: str, project: str, accelerator_type: str, version: str, spot: bool, package: str | None,
    tensorflow_package: str, tensorflow_find_links: str, trainer_flags: list[str], create: bool, install: bool,
) -> list[list[str]]:
    """The gcloud argument lists to run in order (see the module docstring).

    Raises:
        ValueError: an invalid flag value, named in the message.
    """
    check_names(name=name, zone=zone, accelerator_type=accelerator_type, project=project)
    commands = []
    ssh = _gcloud_tpu("ssh", name, zone, project) + ["--worker=all"]
    if install:
        script = make_install_script(
            package=package or "", tensorflow_package=tensorflow_package, tensorflow_find_links=tensorflow_find_links,
        )
        if package.startswith("gs://"):
            # First of all: the hosts copy the wheel only after create, when the TPU VM is already billed.
            commands.append(make_check_command(package=package, project=project))
    if create:
        commands.append(make_create_command(
            name=name, zone=zone, project=project, accelerator_type=accelerator_type, version=version, spot=spot,
        ))
    if install:
        commands.append(ssh + [f"--command={script}"])
    commands.append(ssh + [f"--command={make_train_script(trainer_flags)}"])
    return commands


def main(argv: list[str]) -> int:
    try:
        commands = make_commands(
            name=FLAGS.name, zone=FLAGS.zone, project=FLAGS.project, accelerator_type=FLAGS.accelerator_type,
            version=FLAGS.version, spot=FLAGS.spot, package=FLAGS.package, tensorflow_package=FLAGS.tensorflow_package,
            tensorflow_find_links=FLAGS.tensorflow_find_links, trainer_flags=argv[1:], create=FLAGS.create,
            install=FLAGS.install,
        )
    except ValueError as error:
        trainer_args.fail(str(error))
    for command in commands:
        print(shlex.join(command), file=sys.stdout if FLAGS.dry_run else sys.stderr, flush=True)
        if FLAGS.dry_run:
            continue
        code = trainer_args.run_tool(command, install_hint="install the Google Cloud CLI")
        if code != 0:
            return code
    return 0


def run() -> None:
    """Entry point of `python -m launch.tpu_vm` and of the `launch-tpu-vm` console script."""
    define_flags()
    app.run(main, flags_parser=trainer_args.parse_flags)


if __name__ == "__main__":
    run()
