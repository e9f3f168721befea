"""launch/vertex_serving.py (through launch.vertex --action=...): the Model Registry upload and the endpoint
deployment, their request bodies checked against the REST API's required fields, and flag errors (dry runs only)."""

import json
import subprocess
import sys

import pytest

from launch import vertex_serving
from tests.conftest import REPO_ROOT

# Generous: a subprocess that starts Python on a loaded 2-core machine; the test never measures this.
SUBPROCESS_TIMEOUT_SECONDS = 300

# Required by the Vertex AI REST reference (v1): Model (models.upload) and DeployedModel (endpoints.deployModel).
MODEL_REQUIRED = ("displayName",)
CONTAINER_SPEC_REQUIRED = ("imageUri",)
DEPLOYED_MODEL_REQUIRED = ("model",)
DEDICATED_RESOURCES_REQUIRED = ("machineSpec", "minReplicaCount")


def serving(**settings) -> vertex_serving.Serving:
    return vertex_serving.Serving(**{"display_name": "flowers", "project": "my-project", **settings})


def test_upload_puts_the_saved_model_of_a_run_behind_a_prebuilt_tensorflow_container():
    body = vertex_serving.request_body("upload_model", serving(model_dir="gs://b/runs/flowers/"))
    model = body["model"]
    assert all(model.get(field) for field in MODEL_REQUIRED)
    assert all(model["containerSpec"].get(field) for field in CONTAINER_SPEC_REQUIRED)
    assert model["artifactUri"] == "gs://b/runs/flowers/saved_model"
    assert vertex_serving.artifact_uri("gs://b/m/saved_model/") == "gs://b/m/saved_model"
    command = vertex_serving.gcloud_command("upload_model", serving(model_dir="gs://b/m"))
    assert command[:4] == ["gcloud", "ai", "models", "upload"]
    assert "--artifact-uri=gs://b/m/saved_model" in command and "--project=my-project" in command
    assert f"--container-image-uri={vertex_serving.DEFAULT_SERVING_IMAGE}" in command


@pytest.mark.parametrize("settings, message", [
    ({"model_dir": "/tmp/flowers_model"}, "must be the gs:// --model_dir"),
    ({"model_dir": "gs://b/m", "serving_image_uri": "gcr.io/me/server:1"}, "not a prebuilt TensorFlow prediction"),
    ({"model_dir": "gs://b/m", "region": "moon"}, "not a region name"),
])
def test_upload_flag_errors_say_what_to_give(settings, message):
    with pytest.raises(ValueError, match=message):
        vertex_serving.gcloud_command("upload_model", serving(**settings))


def test_deploy_gives_dedicated_resources_with_the_required_fields():
    settings = dict(model_id="123", endpoint_id="456", machine_type="n1-standard-8", accelerator_type="NVIDIA_TESLA_T4",
                    min_replica_count=1, max_replica_count=3)
    body = vertex_serving.request_body("deploy_model", serving(**settings))
    deployed = body["deployedModel"]
    assert all(deployed.get(field) for field in DEPLOYED_MODEL_REQUIRED)
    assert all(field in deployed["dedicatedResources"] for field in DEDICATED_RESOURCES_REQUIRED)
    assert deployed["model"] == "projects/my-project/locations/us-central1/models/123"
    assert deployed["dedicatedResources"] == {
        "machineSpec": {"machineType": "n1-standard-8", "acceleratorType": "NVIDIA_TESLA_T4", "acceleratorCount": 1},
        "minReplicaCount": 1, "maxReplicaCount": 3,
    }
    assert body["trafficSplit"] == {"0": 100}
    command = vertex_serving.gcloud_command("deploy_model", serving(**settings))
    assert command[:5] == ["gcloud", "ai", "endpoints", "deploy-model", "456"]
    assert "--model=123" in command and "--accelerator=type=nvidia-tesla-t4,count=1" in command
    assert "--min-replica-count=1" in command and "--max-replica-count=3" in command


@pytest.mark.parametrize("settings, message", [
    ({"endpoint_id": "456"}, "needs --model_id"),
    ({"model_id": "123", "endpoint_id": "456", "min_replica_count": 3, "max_replica_count": 2}, "1 <= min <= max"),
    ({"model_id": "123", "endpoint_id": "456", "accelerator_type": "TPU_V3"}, "serve on CPUs and GPUs"),
])
def test_deploy_flag_errors_say_what_to_give(settings, message):
    with pytest.raises(ValueError, match=message):
        vertex_serving.gcloud_command("deploy_model", serving(**settings))


def run_launcher(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.vertex", *arguments], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_SECONDS)


def test_cli_dry_runs_print_the_request_and_the_command():
    completed = run_launcher("--action=upload_model", "--display_name=flowers", "--model_dir=gs://b/m", "--dry_run")
    assert completed.returncode == 0, completed.stderr
    body, command = completed.stdout.rsplit("\n}\n", 1)
    assert json.loads(body + "\n}")["model"]["artifactUri"] == "gs://b/m/saved_model"
    assert command.startswith("gcloud ai models upload --region=us-central1 --display-name=flowers ")
    completed = run_launcher("--action=create_endpoint", "--display_name=flowers-endpoint", "--dry_run")
    assert completed.returncode == 0 and "gcloud ai endpoints create" in completed.stdout


def test_cli_errors_exit_2_with_one_line():
    completed = run_launcher("--action=deploy_model", "--display_name=flowers", "--dry_run")
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1].startswith("error: --action=deploy_model needs --model_id")
    completed = run_launcher("--action=upload_model", "--model_dir=gs://b/m")  # not a dry run: needs --project
    assert completed.returncode == 2 and "--project is required" in completed.stderr
