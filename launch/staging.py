"""Builds this project's wheel and uploads it, and any local data folders, to a gs:// staging folder.

    python -m launch.staging --staging_dir=gs://my-bucket/staging --local_path=/tmp/flowers_tfrecords

prints the uploaded locations, e.g.

    package gs://my-bucket/staging/packages/imagefolder_transfer-0.1.0-py3-none-any.whl
    data gs://my-bucket/staging/data/flowers_tfrecords (14 files)

The wheel is what `python -m launch.tpu_vm --package=...` installs on each host; the data folder is what the
trainer's --data_dir then points at. The wheel is built from a copy of the project (so the checkout gets no
build/ or *.egg-info), with `python -m build` when installed, else `pip wheel --no-deps`; both without build
isolation, so no download is needed. Uploads use google-cloud-storage with the application default
credentials (STORAGE_EMULATOR_HOST points it at an emulator, as the tests do). The local inputs (--staging_dir's
form, every --local_path, a source checkout for --package) are checked before the storage client is created, so
a typo is reported as such, at once, even where no credentials or network are available.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
from google.api_core import exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import storage

from launch import trainer_args

FLAGS = flags.FLAGS

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_PACKAGED = (".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "tests",
                "demo_output", "benchmarks")


def define_flags() -> None:
    """Defines this program's flags; called by run(), not at import (other launchers share names)."""
    flags.DEFINE_string("staging_dir", None, "gs://bucket/folder to upload to (packages/ and data/ go under it).")
    flags.DEFINE_multi_string("local_path", [], "A local folder or file to upload under <staging_dir>/data/; repeatable.")
    flags.DEFINE_string("project", None, "Google Cloud project of the storage client; default: from the environment.")
    flags.DEFINE_bool("package", True, "Build and upload the wheel (--nopackage: only the data).")


def split_gcs_uri(uri: str) -> tuple[str, str]:
    """gs://bucket/some/folder -> ("bucket", "some/folder"); the folder part may be empty.

    Raises:
        ValueError: uri is not gs://<bucket>[/<folder>].
    """
    if not uri.startswith("gs://") or not uri[5:].split("/", 1)[0]:
        raise ValueError(f"--staging_dir {uri!r} must be gs://<bucket>[/<folder>]")
    bucket, _, folder = uri[5:].partition("/")
    return bucket, folder.strip("/")


def build_wheel(*, project_dir: str, output_dir: str) -> str:
    """Builds the project's wheel into output_dir from a temporary copy of project_dir; returns its path."""
    with tempfile.TemporaryDirectory(prefix="staging_source_") as source:
        source = os.path.join(source, "project")
        shutil.copytree(project_dir, source, ignore=shutil.ignore_patterns(*NOT_PACKAGED))
        if importlib.util.find_spec("build") is not None:
            command = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", output_dir, source]
        else:
            command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir",
                       output_dir, source]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"building the wheel failed ({' '.join(command[1:4])}):\n{result.stderr[-2000:]}")
    wheels = sorted(name for name in os.listdir(output_dir) if name.endswith(".whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel in {output_dir}, found {wheels}")
    return os.path.join(output_dir, wheels[0])


def upload_file(*, client, local_path: str, bucket: str, name: str) -> str:
    """Uploads one file to gs://bucket/name; returns that URI."""
    client.bucket(bucket).blob(name).upload_from_filename(local_path)
    return f"gs://{bucket}/{name}"


def upload_path(*, client, local_path: str, bucket: str, prefix: str) -> tuple[str, int]:
    """Uploads a file, or a folder's files keeping their relative paths, under gs://bucket/prefix/<basename>.

    Returns:
        (the gs:// URI of the uploaded file or folder, the number of files).
    """
    local_path = os.path.abspath(local_path)
    base = "/".join(part for part in (prefix, os.path.basename(local_path)) if part)
    if os.path.isfile(local_path):
        return upload_file(client=client, local_path=local_path, bucket=bucket, name=base), 1
    count = 0
    for folder, _, files in os.walk(local_path):
        for file_name in sorted(files):
            path = os.path.join(folder, file_name)
            relative = os.path.relpath(path, local_path).replace(os.sep, "/")
            upload_file(client=client, local_path=path, bucket=bucket, name=f"{base}/{relative}")
            count += 1
    return f"gs://{bucket}/{base}", count


def check_local_inputs(*, staging_dir: str, local_paths: list[str], package: bool, project_dir: str) -> None:
    """Checks what can be checked without credentials or network; main calls it before creating the client.

    Raises:
        ValueError: a bad --staging_dir, a --local_path that does not exist, or --package where project_dir is not
            a source checkout (the installed `launch-staging` script's project folder is site-packages).
    """
    split_gcs_uri(staging_dir)
    for path in local_paths:
        if not os.path.exists(path):
            raise ValueError(f"--local_path {path!r} does not exist")
    if package and not os.path.isfile(os.path.join(project_dir, "setup.py")):
        raise ValueError(
            f"--package builds the wheel from a source checkout, but {project_dir!r} has no setup.py; run "
            f"`python -m launch.staging` from a clone of the project, or pass --nopackage to upload only the data"
        )


def stage(*, client, staging_dir: str, local_paths: list[str], package: bool, project_dir: str = PROJECT_DIR) -> list[str]:
    """Uploads the wheel (if package) and local_paths under staging_dir; returns one summary line per upload.

    Raises:
        ValueError: see check_local_inputs.
    """
    check_local_inputs(staging_dir=staging_dir, local_paths=local_paths, package=package, project_dir=project_dir)
    bucket, folder = split_gcs_uri(staging_dir)
    lines = []
    if package:
        with tempfile.TemporaryDirectory(prefix="staging_wheel_") as output_dir:
            wheel = build_wheel(project_dir=project_dir, output_dir=output_dir)
            name = "/".join(part for part in (folder, "packages", os.path.basename(wheel)) if part)
            lines.append("package " + upload_file(client=client, local_path=wheel, bucket=bucket, name=name))
    data_prefix = "/".join(part for part in (folder, "data") if part)
    for path in local_paths:
        uri, count = upload_path(client=client, local_path=path, bucket=bucket, prefix=data_prefix)
        lines.append(f"data {uri} ({count} files)")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        trainer_args.fail(f"unexpected arguments: {argv[1:]}")
    trainer_args.require(FLAGS.staging_dir, "staging_dir")
    try:
        # Local mistakes first: creating the client looks for credentials (and may probe the metadata server).
        check_local_inputs(staging_dir=FLAGS.staging_dir, local_paths=FLAGS.local_path, package=FLAGS.package,
                           project_dir=PROJECT_DIR)
        client = storage.Client(project=FLAGS.project)
        lines = stage(client=client, staging_dir=FLAGS.staging_dir, local_paths=FLAGS.local_path, package=FLAGS.package,
                      project_dir=PROJECT_DIR)
    except ValueError as error:
        trainer_args.fail(str(error))
    except (RuntimeError, exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError) as error:
        print(f"error: {error}".splitlines()[0], file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def run() -> None:
    """Entry point of `python -m launch.staging` and of the `launch-staging` console script."""
    define_flags()
    app.run(main, flags_parser=trainer_args.parse_flags)


if __name__ == "__main__":
    run()
