"""launch/kubernetes.py: the Service + Indexed Job manifests, their YAML, and the per-pod TF_CONFIG script."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from launch import kubernetes
from tests.conftest import REPO_ROOT

# Generous: a subprocess that starts Python on a loaded 2-core machine; the test never measures this.
SUBPROCESS_TIMEOUT_SECONDS = 300

DEFAULTS = dict(
    name="flowers-mw", namespace="ml", image_uri="gcr.io/p/image:1", num_workers=3, port=2222, gpus_per_worker=1,
    cpu="4", memory="16Gi", backoff_limit=6, service_account="trainer", trainer_flags=["--data_dir=gs://b/d"],
)


def test_indexed_job_and_headless_service():
    service, job = yaml.safe_load_all(kubernetes.to_yaml(kubernetes.make_manifests(**DEFAULTS)[0]) + "---\n"
                                      + kubernetes.to_yaml(kubernetes.make_manifests(**DEFAULTS)[1]))
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == job["spec"]["template"]["metadata"]["labels"]
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == job["metadata"]["name"]
    assert pod["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert pod["serviceAccountName"] == "trainer"
    (container,) = pod["containers"]
    assert container["image"] == "gcr.io/p/image:1"
    assert container["args"] == ["--data_dir=gs://b/d", "--strategy=multi_worker"]
    assert container["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"},
                                      "limits": {"memory": "16Gi", "nvidia.com/gpu": 1}}
    workers = json.loads({item["name"]: item["value"] for item in container["env"]}["TF_CONFIG_WORKERS"])
    assert workers == ["flowers-mw-0.flowers-mw:2222", "flowers-mw-1.flowers-mw:2222", "flowers-mw-2.flowers-mw:2222"]
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [75]}} in rules
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    assert rules[-1]["action"] == "FailJob" and rules[-1]["onExitCodes"]["values"] == [2]


def test_each_pod_builds_its_tf_config_and_gets_the_flags_verbatim(tmp_path):
    (container,) = kubernetes.make_manifests(**{**DEFAULTS, "trainer_flags": ["--model_dir=gs://b/a b", "--x=$(id)"]})[1][
        "spec"]["template"]["spec"]["containers"]
    # A stand-in `python` that prints what the trainer would receive.
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho "$TF_CONFIG"\nfor arg in "$@"; do echo "$arg"; done\n')
    fake_python.chmod(0o755)
    environment = {item["name"]: item["value"] for item in container["env"]}
    result = subprocess.run(
        [*container["command"], *container["args"]], capture_output=True, text=True, check=True,
        env={**environment, "JOB_COMPLETION_INDEX": "2", "PATH": f"{tmp_path}:{os.environ['PATH']}"},
    )
    lines = result.stdout.splitlines()
    assert json.loads(lines[0]) == {"cluster": {"worker": json.loads(environment["TF_CONFIG_WORKERS"])},
                                    "task": {"type": "worker", "index": 2}}
    assert lines[1:] == ["-m", "trainer.train", "--model_dir=gs://b/a b", "--x=$(id)", "--strategy=multi_worker"]


@pytest.mark.parametrize("value", [
    {"a": "yes", "b": "1.0", "c": "", "d": [], "e": {}, "f": [{"g": [1, 2], "h": "x: y # z"}], "i": True, "j": "é\n\"'"},
    [[1, 2], [], {"k": "null"}],
])
def test_yaml_round_trips(value):
    assert yaml.safe_load(kubernetes.to_yaml(value)) == value


@pytest.mark.parametrize("changes, message", [
    (dict(name="Flowers_MW"), "--name 'Flowers_MW' must be"),
    (dict(num_workers=0), "--num_workers 0 must be at least 1"),
    (dict(port=70000), "--port 70000"),
    (dict(memory="16 GB"), "--memory '16 GB' is not a Kubernetes quantity"),
    (dict(trainer_flags=["--strategy=mirrored"]), "trainer flag --strategy=mirrored conflicts"),
])
def test_invalid_flags_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        kubernetes.make_manifests(**{**DEFAULTS, **changes})


def test_dry_run_prints_yaml():
    result = subprocess.run(
        [sys.executable, "-m", "launch.kubernetes", "--image_uri=gcr.io/p/image:1", "--num_workers=2", "--dry_run",
         "--", "--data_dir=gs://b/d", "--model_dir=gs://b/m"],
        cwd=REPO_ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(REPO_ROOT)},
        timeout=SUBPROCESS_TIMEOUT_SECONDS,
    )
    assert result.returncode == 0, result.stderr
    service, job = yaml.safe_load_all(result.stdout)
    assert (service["kind"], job["kind"]) == ("Service", "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][-1] == "--strategy=multi_worker"
