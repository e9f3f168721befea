"""Submits the trainer's container as a Vertex AI CustomJob: one GPU machine, several, or a TPU VM.

    python -m launch.vertex --project=my-project --region=us-central1 --display_name=flowers-mw \
        --image_uri=us-central1-docker.pkg.dev/my-project/images/imagefolder-transfer:gpu \
        --shape=multi_worker --num_workers=4 --machine_type=n1-standard-8 \
        --accelerator_type=NVIDIA_TESLA_T4 --accelerator_count=1 --staging_bucket=gs://my-bucket/vertex \
        --dry_run -- --data_dir=gs://my-bucket/flowers_tfrecords --model_dir=gs://my-bucket/flowers_mw \
        --precision=mixed_float16

Everything after `--` becomes the container's args verbatim (the image's entry point is
`python -m trainer.train`, see the Dockerfile), plus the strategy the shape needs:

- `single`: one machine with --accelerator_count GPUs, `--strategy=mirrored`.
- `multi_worker`: a chief pool (1 replica) and a workers pool (--num_workers - 1 replicas) of identical
  machines, `--strategy=multi_worker`; Vertex AI sets TF_CONFIG on each (task type chief or worker).
- `tpu`: one TPU VM (--machine_type=cloud-tpu with TPU_V2/TPU_V3 x 8, or ct5lp-hightpu-4t and
  --tpu_topology=2x2 for v5e), `--strategy=tpu --tpu=local`, and `--precision=mixed_bfloat16` unless given.

A trainer flag that contradicts the shape (e.g. --strategy=mirrored with --shape=multi_worker) is refused.
`scheduling.restartJobOnWorkerRestart` (on by default) restarts every replica when one restarts, which is what
MultiWorkerMirroredStrategy needs; the restarted trainer resumes from its last checkpoint in --model_dir.
`--dry_run` prints the CustomJobSpec JSON (what `gcloud ai custom-jobs create --config` reads) and the gcloud
command; without it the spec is written to --spec_file (or a temporary file) and that command is run. Every flag,
--spec_file's folder and (to submit) --project are checked before --spec_file is written or gcloud runs.

--action=upload_model, create_endpoint and deploy_model serve a finished run online instead (see
launch/vertex_serving.py): the SavedModel into the Model Registry with a prebuilt TensorFlow prediction container,
an endpoint, and the model deployed on it, e.g.

    python -m launch.vertex --action=upload_model --project=my-project --display_name=flowers \
        --model_dir=gs://my-bucket/flowers_model --dry_run
"""

import dataclasses
import json
import os
import re
import shlex
import sys
import tempfile

from absl import app
from absl import flags

from launch import trainer_args, vertex_serving

FLAGS = flags.FLAGS

SHAPES = ("single", "multi_worker", "tpu")
DEFAULT_MACHINE_TYPES = {"single": "n1-standard-8", "multi_worker": "n1-standard-8", "tpu": "cloud-tpu"}
DEFAULT_ACCELERATORS = {"single": ("NVIDIA_TESLA_T4", 1), "multi_worker": ("NVIDIA_TESLA_T4", 1), "tpu": ("TPU_V3", 8)}
TPU_VM_MACHINE_PREFIXES = ("cloud-tpu", "ct")  # cloud-tpu (v2/v3), ct5lp-hightpu-* (v5e), ct6e-* (v6e)
PLACEHOLDER_SPEC_FILE = "custom_job_spec.json"


def define_flags() -> None:
    """Defines this program's flags; called by run(), not at import (other launchers share names)."""
    flags.DEFINE_string("project", None, "Google Cloud project ID.")
    flags.DEFINE_string("region", "us-central1", "Vertex AI region, e.g. us-central1, europe-west4.")
    flags.DEFINE_string("display_name", "imagefolder-transfer", "The job's name in the console.")
    flags.DEFINE_string("image_uri", None, "Training container (built from the Dockerfile), e.g. REGION-docker.pkg.dev/PROJECT/REPO/IMAGE:TAG.")
    flags.DEFINE_enum("shape", "single", list(SHAPES), "single: 1 machine x N GPUs; multi_worker: chief + workers pools; tpu: one TPU VM.")
    flags.DEFINE_integer("num_workers", 2, "With --shape=multi_worker: machines in all (1 chief + num_workers-1 workers).")
    flags.DEFINE_string("machine_type", "", "Compute Engine machine type; '' = n1-standard-8 for GPUs, cloud-tpu for --shape=tpu.")
    flags.DEFINE_string(
        "accelerator_type", "",
        "e.g. NVIDIA_TESLA_T4, NVIDIA_L4, NVIDIA_TESLA_A100, TPU_V2, TPU_V3; '' = NVIDIA_TESLA_T4 (GPU shapes) or TPU_V3; "
        "NONE for a CPU-only machine.",
    )
    flags.DEFINE_integer("accelerator_count", 0, "Accelerators per machine; 0 = 1 GPU, or 8 TPU cores.")
    flags.DEFINE_string("tpu_topology", "", "machineSpec.tpuTopology for TPU v5e/v6e machine types, e.g. 2x2.")
    flags.DEFINE_string("staging_bucket", None, "gs:// folder for the job's outputs (baseOutputDirectory; Vertex sets AIP_MODEL_DIR under it).")
    flags.DEFINE_string("service_account", "", "Service account the job runs as; '' = the project's default Vertex AI one.")
    flags.DEFINE_bool("spot", False, "Run on Spot VMs (cheaper, preemptible; the job restarts and resumes from checkpoints).")
    flags.DEFINE_bool("restart_job_on_worker_restart", True, "scheduling.restartJobOnWorkerRestart: restart all replicas when one restarts.")
    flags.DEFINE_integer("timeout_hours", 0, "scheduling.timeout in hours; 0 = Vertex AI's default (7 days).")
    flags.DEFINE_string("spec_file", "", "Write the spec here; '' = print it (--dry_run) or use a temporary file.")
    flags.DEFINE_bool("dry_run", False, "Print the spec and the gcloud command, submit nothing.")
    flags.DEFINE_enum("action", "train", ["train", *vertex_serving.ACTIONS],
                      "train: a CustomJob (above); upload_model, create_endpoint, deploy_model: online serving.")
    flags.DEFINE_string("model_dir", "", "--action=upload_model: the gs:// --model_dir of a finished run.")
    flags.DEFINE_string("serving_image_uri", vertex_serving.DEFAULT_SERVING_IMAGE,
                        "--action=upload_model: a prebuilt TensorFlow prediction container (tf2-cpu or tf2-gpu).")
    flags.DEFINE_string("model_id", "", "--action=deploy_model: the Model Registry id upload_model printed.")
    flags.DEFINE_string("endpoint_id", "", "--action=deploy_model: the endpoint id create_endpoint printed.")
    flags.DEFINE_integer("min_replica_count", 1, "--action=deploy_model: machines kept serving.")
    flags.DEFINE_integer("max_replica_count", 1, "--action=deploy_model: most machines autoscaling may add.")


def make_machine_spec(*, machine_type: str, accelerator_type: str, accelerator_count: int, tpu_topology: str) -> dict:
    """Vertex AI machineSpec; no accelerator fields for accelerator_type NONE."""
    spec = {"machineType": machine_type}
    if accelerator_type != "NONE":
        spec.update(acceleratorType=accelerator_type, acceleratorCount=accelerator_count)
    if tpu_topology:
        spec["tpuTopology"] = tpu_topology
    return spec


def make_trainer_arguments(*, shape: str, trainer_flags: list[str]) -> list[str]:
    """trainer_flags plus the flags the shape decides (see the module docstring).

    Raises:
        ValueError: a trainer flag contradicts the shape.
    """
    if shape == "single":
        return trainer_args.with_flag(trainer_flags, "strategy", "mirrored")
    if shape == "multi_worker":
        return trainer_args.with_flag(trainer_flags, "strategy", "multi_worker")
    if shape == "tpu":
        arguments = trainer_args.with_flag(trainer_flags, "strategy", "tpu")
        arguments = trainer_args.with_flag(arguments, "tpu", "local")
        return trainer_args.with_default_flag(arguments, "precision", "mixed_bfloat16")
    raise ValueError(f"Unknown shape: {shape!r}")


@dataclasses.dataclass(frozen=True)
class Machine:
    """The machine of every worker pool (the flags of the same names); empty values take the shape's defaults."""

    machine_type: str = ""
    accelerator_type: str = ""
    accelerator_count: int = 0
    tpu_topology: str = ""


def make_job_spec(
    *, shape: str, image_uri: str, trainer_flags: list[str], num_workers: int, machine: Machine,
    staging_bucket: str | None, service_account: str, spot: bool, restart_job_on_worker_restart: bool,
    timeout_hours: int,
) -> dict:
    """The CustomJobSpec (the `jobSpec` of a CustomJob; the file `gcloud ai custom-jobs create --config` reads).

    Args: as the flags of the same names, the machine's in `machine`.

    Raises:
        ValueError: a flag value that Vertex AI would reject or that contradicts the shape.
    """
    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r} must be one of {', '.join(SHAPES)}")
    if not image_uri or any(character.isspace() for character in image_uri):
        raise ValueError(f"--image_uri {image_uri!r} must be a container image, e.g. REGION-docker.pkg.dev/PROJECT/REPO/IMAGE:TAG")
    machine_type = machine.machine_type or DEFAULT_MACHINE_TYPES[shape]
    default_type, default_count = DEFAULT_ACCELERATORS[shape]
    accelerator_type = machine.accelerator_type or default_type
    accelerator_count = machine.accelerator_count or default_count
    if accelerator_count < 0:
        raise ValueError(f"--accelerator_count {accelerator_count} must be >= 0")
    if shape == "multi_worker" and num_workers < 2:
        raise ValueError(f"--num_workers {num_workers} must be at least 2 with --shape=multi_worker (use --shape=single for one machine)")
    if shape == "tpu" and (not accelerator_type.startswith("TPU_") or not machine_type.startswith(TPU_VM_MACHINE_PREFIXES)):
        raise ValueError(
            f"--shape=tpu needs a TPU machine: got --machine_type={machine_type} --accelerator_type={accelerator_type}; "
            "use e.g. --machine_type=cloud-tpu --accelerator_type=TPU_V3 --accelerator_count=8"
        )
    if shape != "tpu" and accelerator_type.startswith("TPU_"):
        raise ValueError(f"--accelerator_type {accelerator_type} is a TPU: use --shape=tpu")
    if staging_bucket is not None and not staging_bucket.startswith("gs://"):
        raise ValueError(f"--staging_bucket {staging_bucket!r} must be a gs:// path")
    if timeout_hours < 0:
        raise ValueError(f"--timeout_hours {timeout_hours} must be >= 0")

    machine_spec = make_machine_spec(
        machine_type=machine_type, accelerator_type=accelerator_type, accelerator_count=accelerator_count,
        tpu_topology=machine.tpu_topology,
    )
    container_spec = {"imageUri": image_uri, "args": make_trainer_arguments(shape=shape, trainer_flags=trainer_flags)}

    def pool(replica_count: int) -> dict:
        return {"machineSpec": dict(machine_spec), "replicaCount": replica_count, "containerSpec": json.loads(json.dumps(container_spec))}

    # Vertex AI makes pool 0 the chief ("chief" in TF_CONFIG) and pool 1 the workers.
    pools = [pool(1)] if shape != "multi_worker" else [pool(1), pool(num_workers - 1)]
    spec = {"workerPoolSpecs": pools}
    scheduling = {"restartJobOnWorkerRestart": restart_job_on_worker_restart}
    if timeout_hours:
        scheduling["timeout"] = f"{timeout_hours * 3600}s"
    if spot:
        scheduling["strategy"] = "SPOT"
    spec["scheduling"] = scheduling
    if staging_bucket:
        spec["baseOutputDirectory"] = {"outputUriPrefix": staging_bucket}
    if service_account:
        spec["serviceAccount"] = service_account
    return spec


def make_gcloud_command(*, project: str | None, region: str, display_name: str, spec_file: str) -> list[str]:
    """`gcloud ai custom-jobs create` for a spec file, as an argument list.

    Raises:
        ValueError: a malformed --region or empty --display_name.
    """
    if not re.fullmatch(r"[a-z]+-[a-z]+[0-9]+", region):
        raise ValueError(f"--region {region!r} is not a region name such as us-central1")
    if not display_name.strip():
        raise ValueError("--display_name must not be empty")
    command = ["gcloud", "ai", "custom-jobs", "create", f"--region={region}", f"--display-name={display_name}",
               f"--config={spec_file}"]
    if project:
        command.insert(4, f"--project={project}")
    return command


def serve(argv: list[str]) -> int:
    """--action=upload_model, create_endpoint or deploy_model: print (--dry_run) or run one gcloud command."""
    if len(argv) > 1:
        trainer_args.fail(f"--action={FLAGS.action} takes no trainer flags after --: got {argv[1:]}")
    try:
        serving = vertex_serving.Serving(
            display_name=FLAGS.display_name, region=FLAGS.region, project=FLAGS.project, model_dir=FLAGS.model_dir,
            serving_image_uri=FLAGS.serving_image_uri, model_id=FLAGS.model_id, endpoint_id=FLAGS.endpoint_id,
            machine_type=FLAGS.machine_type or "n1-standard-4",
            accelerator_type="" if FLAGS.accelerator_type in ("", "NONE") else FLAGS.accelerator_type,
            accelerator_count=FLAGS.accelerator_count, min_replica_count=FLAGS.min_replica_count,
            max_replica_count=FLAGS.max_replica_count,
        )
        command = vertex_serving.gcloud_command(FLAGS.action, serving)
        body = vertex_serving.request_body(FLAGS.action, serving)
    except ValueError as error:
        trainer_args.fail(str(error))
    if FLAGS.dry_run:
        print(json.dumps(body, indent=2))
        print(shlex.join(command))
        return 0
    if not FLAGS.project:
        trainer_args.fail("--project is required to run it (or pass --dry_run)")
    print(shlex.join(command), file=sys.stderr)
    return trainer_args.run_tool(command, install_hint="install the Google Cloud CLI")


def check_spec_file(spec_file: str) -> None:
    """Checks that --spec_file ('' = none) can be written as a file, before anything is written or run.

    Raises:
        ValueError: spec_file is a folder, or its folder does not exist.
    """
    if not spec_file:
        return
    if os.path.isdir(spec_file):
        example = os.path.join(spec_file, PLACEHOLDER_SPEC_FILE)
        raise ValueError(f"--spec_file {spec_file!r} is a folder; give a file path such as {example!r}")
    folder = os.path.dirname(os.path.abspath(spec_file))
    if not os.path.isdir(folder):
        problem = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise ValueError(f"--spec_file {spec_file!r}: its folder {folder!r} {problem}; create it or give another path")


def write_spec_file(spec_file: str, text: str) -> None:
    """Writes the spec to --spec_file; a write that still fails (e.g. no permission) is one error line."""
    try:
        with open(spec_file, "w", encoding="utf-8") as file:
            file.write(text + "\n")
    except OSError as error:
        trainer_args.fail(f"--spec_file {spec_file!r}: cannot write it: {error.strerror or error}")


def main(argv: list[str]) -> int:
    if FLAGS.action != "train":
        return serve(argv)
    try:
        spec = make_job_spec(
            shape=FLAGS.shape, image_uri=FLAGS.image_uri or "", trainer_flags=argv[1:], num_workers=FLAGS.num_workers,
            machine=Machine(machine_type=FLAGS.machine_type, accelerator_type=FLAGS.accelerator_type,
                            accelerator_count=FLAGS.accelerator_count, tpu_topology=FLAGS.tpu_topology),
            staging_bucket=FLAGS.staging_bucket, service_account=FLAGS.service_account, spot=FLAGS.spot,
            restart_job_on_worker_restart=FLAGS.restart_job_on_worker_restart, timeout_hours=FLAGS.timeout_hours,
        )
        make_gcloud_command(project=FLAGS.project, region=FLAGS.region, display_name=FLAGS.display_name, spec_file="x")
        check_spec_file(FLAGS.spec_file)
    except ValueError as error:
        trainer_args.fail(str(error))
    if not FLAGS.dry_run and not FLAGS.project:
        trainer_args.fail("--project is required to submit (or pass --dry_run)")
    # Every flag and local input is checked: only now is anything written.
    text = json.dumps(spec, indent=2)
    if FLAGS.spec_file:
        write_spec_file(FLAGS.spec_file, text)
    if FLAGS.dry_run:
        command = make_gcloud_command(project=FLAGS.project, region=FLAGS.region, display_name=FLAGS.display_name,
                                      spec_file=FLAGS.spec_file or PLACEHOLDER_SPEC_FILE)
        print(text)
        note = "" if FLAGS.spec_file else f"  # after saving the JSON above as {PLACEHOLDER_SPEC_FILE}"
        print(shlex.join(command) + note)
        return 0
    spec_file = FLAGS.spec_file
    if not spec_file:
        handle, spec_file = tempfile.mkstemp(prefix="custom_job_", suffix=".json")
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text + "\n")
    command = make_gcloud_command(project=FLAGS.project, region=FLAGS.region, display_name=FLAGS.display_name,
                                  spec_file=spec_file)
    print(shlex.join(command), file=sys.stderr)
    return trainer_args.run_tool(command, install_hint="install the Google Cloud CLI")


def run() -> None:
    """Entry point of `python -m launch.vertex` and of the `launch-vertex` console script."""
    define_flags()
    app.run(main, flags_parser=trainer_args.parse_flags)


if __name__ == "__main__":
    run()
