"""Runs N MultiWorkerMirroredStrategy workers on Kubernetes: an Indexed Job plus a headless Service.

    python -m launch.kubernetes --name=flowers-mw --num_workers=4 --gpus_per_worker=1 \
        --image_uri=us-central1-docker.pkg.dev/my-project/images/imagefolder-transfer:gpu \
        --dry_run -- --data_dir=gs://my-bucket/flowers_tfrecords --model_dir=gs://my-bucket/flowers_mw

Why an Indexed Job and not a Kubeflow TFJob: it needs nothing but Kubernetes >= 1.31 (podFailurePolicy is
stable there), no operator to install. Pod i of job NAME gets the hostname NAME-i in the Service's subdomain,
so every worker reaches NAME-i.NAME:PORT; each pod builds its TF_CONFIG from the cluster list (env
TF_CONFIG_CLUSTER, written here) and its JOB_COMPLETION_INDEX (set by Kubernetes), then execs the trainer
with the flags after `--` verbatim (passed as the container's args, never through a shell) plus
`--strategy=multi_worker`.

podFailurePolicy: exit code 75 (the trainer saved a checkpoint after SIGTERM) and pod disruptions (node
drain, Spot preemption) are retried without counting against --backoff_limit; exit code 2 (bad flags or data)
fails the job at once. A worker lost mid-step makes its peers fail in their collectives; those failures count
against --backoff_limit, and the restarted pods resume from the last checkpoint in --model_dir (which must be
shared storage, e.g. gs://).

`--dry_run` prints the YAML; without it the YAML is piped to `kubectl apply -f -`.
"""

import json
import re

from absl import app
from absl import flags

from launch import trainer_args

FLAGS = flags.FLAGS

CONTAINER_NAME = "trainer"
# Constant: no user input is ever part of it. Trainer flags arrive as "$@" (the container's args).
TF_CONFIG_SCRIPT = (
    'export TF_CONFIG="{\\"cluster\\": {\\"worker\\": ${TF_CONFIG_WORKERS}}, '
    '\\"task\\": {\\"type\\": \\"worker\\", \\"index\\": ${JOB_COMPLETION_INDEX}}}"\n'
    'exec python -m trainer.train "$@"\n'
)
DNS_LABEL = r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?"  # room for the "-<index>" suffix in pod hostnames


def define_flags() -> None:
    """Defines this program's flags; called by run(), not at import (other launchers share names)."""
    flags.DEFINE_string("name", "imagefolder-transfer", "Job and Service name (lowercase letters, digits, hyphens).")
    flags.DEFINE_string("namespace", "default", "Kubernetes namespace.")
    flags.DEFINE_string("image_uri", None, "Training container built from the Dockerfile.")
    flags.DEFINE_integer("num_workers", 2, "Worker pods; pod 0 is the chief.")
    flags.DEFINE_integer("port", 2222, "Port the workers talk on.")
    flags.DEFINE_integer("gpus_per_worker", 0, "nvidia.com/gpu per pod; 0 = CPU only.")
    flags.DEFINE_string("cpu", "", "CPU request per pod, e.g. 4 or 3500m; '' = none.")
    flags.DEFINE_string("memory", "", "Memory request and limit per pod, e.g. 16Gi; '' = none.")
    flags.DEFINE_integer("backoff_limit", 6, "Failed pods tolerated before the job fails (75 and disruptions do not count).")
    flags.DEFINE_string("service_account", "", "Kubernetes service account of the pods (e.g. bound to GCS access); '' = default.")
    flags.DEFINE_bool("dry_run", False, "Print the YAML, apply nothing.")


def worker_addresses(*, name: str, num_workers: int, port: int) -> list[str]:
    """host:port of each pod: Indexed Job pod hostnames NAME-i in the headless Service NAME."""
    return [f"{name}-{index}.{name}:{port}" for index in range(num_workers)]


def make_manifests(
    *, name: str, namespace: str, image_uri: str, num_workers: int, port: int, gpus_per_worker: int, cpu: str,
    memory: str, backoff_limit: int, service_account: str, trainer_flags: list[str],
) -> list[dict]:
    """The headless Service and the Indexed Job, as dicts ready for YAML or JSON.

    Raises:
        ValueError: an invalid flag value, named in the message.
    """
    if not re.fullmatch(DNS_LABEL, name or ""):
        raise ValueError(f"--name {name!r} must be 1-52 lowercase letters, digits or hyphens, starting with a letter")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", namespace or ""):
        raise ValueError(f"--namespace {namespace!r} is not a Kubernetes namespace name")
    if not image_uri or any(character.isspace() for character in image_uri):
        raise ValueError(f"--image_uri {image_uri!r} must be a container image")
    if num_workers < 1:
        raise ValueError(f"--num_workers {num_workers} must be at least 1")
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port} must be in 1-65535")
    if gpus_per_worker < 0 or backoff_limit < 0:
        raise ValueError(f"--gpus_per_worker {gpus_per_worker} and --backoff_limit {backoff_limit} must be >= 0")
    for flag_name, quantity in (("cpu", cpu), ("memory", memory)):
        if quantity and not re.fullmatch(r"[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?", quantity):
            raise ValueError(f"--{flag_name} {quantity!r} is not a Kubernetes quantity such as 4, 500m or 16Gi")
    arguments = trainer_args.with_flag(trainer_flags, "strategy", "multi_worker")

    # Not "job-name": the Job controller sets that label itself.
    labels = {"app.kubernetes.io/name": "imagefolder-transfer", "app.kubernetes.io/instance": name}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        # Headless: DNS gives each pod's own address, and the workers find each other before they are ready.
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": dict(labels),
                 "ports": [{"name": "grpc", "port": port, "targetPort": port}]},
    }
    requests, limits = {}, {}
    if cpu:
        requests["cpu"] = cpu
    if memory:
        requests["memory"] = limits["memory"] = memory
    if gpus_per_worker:
        limits["nvidia.com/gpu"] = gpus_per_worker
    container = {
        "name": CONTAINER_NAME,
        "image": image_uri,
        "command": ["/bin/sh", "-c", TF_CONFIG_SCRIPT, "trainer"],
        "args": arguments,
        "env": [{"name": "TF_CONFIG_WORKERS", "value": json.dumps(worker_addresses(name=name, num_workers=num_workers, port=port))}],
        "ports": [{"containerPort": port, "name": "grpc"}],
    }
    if requests or limits:
        container["resources"] = {key: value for key, value in (("requests", requests), ("limits", limits)) if value}
    pod_spec = {"subdomain": name, "restartPolicy": "Never", "containers": [container]}
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": num_workers,
            "parallelism": num_workers,
            "backoffLimit": backoff_limit,
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In",
                                                     "values": [trainer_args.PREEMPTED_EXIT_CODE]}},
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In",
                                                      "values": [trainer_args.USAGE_EXIT_CODE]}},
            ]},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    return [service, job]


def to_yaml(value, indent: int = 0) -> str:
    """Block-style YAML for dicts, lists, strings, numbers and booleans (no PyYAML needed).

    Strings are written as JSON strings, which YAML reads as double-quoted scalars, so no value can be
    mistaken for a number, a boolean or YAML syntax.
    """
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return pad + "{}\n"
        lines = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:\n{to_yaml(item, indent + 2)}")
            else:
                lines.append(f"{pad}{key}: {to_yaml(item).strip()}\n")
        return "".join(lines)
    if isinstance(value, list):
        if not value:
            return pad + "[]\n"
        lines = []
        for item in value:
            text = to_yaml(item, indent + 2)
            lines.append(f"{pad}- {text[indent + 2:]}")
        return "".join(lines)
    if isinstance(value, bool):
        return pad + ("true" if value else "false") + "\n"
    if isinstance(value, (int, float)):
        return pad + repr(value) + "\n"
    if isinstance(value, str):
        return pad + json.dumps(value) + "\n"
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def main(argv: list[str]) -> int:
    try:
        manifests = make_manifests(
            name=FLAGS.name, namespace=FLAGS.namespace, image_uri=FLAGS.image_uri or "", num_workers=FLAGS.num_workers,
            port=FLAGS.port, gpus_per_worker=FLAGS.gpus_per_worker, cpu=FLAGS.cpu, memory=FLAGS.memory,
            backoff_limit=FLAGS.backoff_limit, service_account=FLAGS.service_account, trainer_flags=argv[1:],
        )
    except ValueError as error:
        trainer_args.fail(str(error))
    text = "---\n".join(to_yaml(manifest) for manifest in manifests)
    if FLAGS.dry_run:
        print(text, end="")
        return 0
    return trainer_args.run_tool(["kubectl", "apply", "-f", "-"], install_hint="install it", input_text=text)


def run() -> None:
    """Entry point of `python -m launch.kubernetes` and of the `launch-kubernetes` console script."""
    define_flags()
    app.run(main, flags_parser=trainer_args.parse_flags)


if __name__ == "__main__":
    run()
