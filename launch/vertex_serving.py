"""Vertex AI online serving of a trained run: upload its SavedModel to the Model Registry, make an endpoint, deploy.

    python -m launch.vertex --action=upload_model --project=my-project --region=us-central1 \
        --display_name=flowers --model_dir=gs://my-bucket/flowers_model --dry_run
    python -m launch.vertex --action=create_endpoint --project=my-project --display_name=flowers-endpoint
    python -m launch.vertex --action=deploy_model --project=my-project --display_name=flowers-v1 \
        --model_id=1234567890 --endpoint_id=9876543210 --machine_type=n1-standard-4 --max_replica_count=3

Each action is one `gcloud ai` command (printed with --dry_run, else run), and its request body as the REST API
takes it (printed with --dry_run): upload_model -> `models.upload` (a Model), deploy_model ->
`endpoints.deployModel` (a DeployedModel with dedicated resources). The upload uses a prebuilt TensorFlow
prediction container (--serving_image_uri, default tf2-cpu.2-15, the newest Vertex AI offers; tf2-gpu for a GPU
deployment) on <model_dir>/saved_model; its `serving_default` signature takes `image_bytes` (base64 in the JSON
request: {"instances": [{"image_bytes": {"b64": "..."}}]}) and returns the class names and probabilities.
The ids the commands print (model, endpoint) are what the next action takes.
"""

import dataclasses
import re

REGION_PATTERN = r"[a-z]+-[a-z]+[0-9]+"
DEFAULT_SERVING_IMAGE = "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest"
PREBUILT_PREDICTION_PATTERN = re.compile(
    r"(?P<location>[a-z]+)-docker\.pkg\.dev/vertex-ai/prediction/tf2-(?P<accelerator>cpu|gpu)\.2-\d+:latest"
)
ACTIONS = ("upload_model", "create_endpoint", "deploy_model")
SAVED_MODEL_DIR = "saved_model"  # trainer/exports/export.py's; the launchers do not import TensorFlow


@dataclasses.dataclass(frozen=True)
class Serving:
    """What the serving actions take (the flags of the same names)."""

    display_name: str
    region: str = "us-central1"
    project: str | None = None
    model_dir: str = ""
    serving_image_uri: str = DEFAULT_SERVING_IMAGE
    model_id: str = ""
    endpoint_id: str = ""
    machine_type: str = "n1-standard-4"
    accelerator_type: str = ""
    accelerator_count: int = 0
    min_replica_count: int = 1
    max_replica_count: int = 1

    def __post_init__(self):
        if not re.fullmatch(REGION_PATTERN, self.region):
            raise ValueError(f"--region {self.region!r} is not a region name such as us-central1")
        if not self.display_name.strip():
            raise ValueError("--display_name must not be empty")


def artifact_uri(model_dir: str) -> str:
    """The SavedModel folder of a run's --model_dir (gs:// only: Vertex AI reads the model from Cloud Storage)."""
    if not model_dir.startswith("gs://") or len(model_dir) <= len("gs://"):
        raise ValueError(f"--model_dir {model_dir!r} must be the gs:// --model_dir of a finished training run")
    model_dir = model_dir.rstrip("/")
    return model_dir if model_dir.endswith("/" + SAVED_MODEL_DIR) else f"{model_dir}/{SAVED_MODEL_DIR}"


def upload_request(serving: Serving) -> dict:
    """The Model of `models.upload` (REST: POST .../locations/REGION/models:upload, body {"model": this})."""
    match = PREBUILT_PREDICTION_PATTERN.fullmatch(serving.serving_image_uri)
    if not match:
        raise ValueError(
            f"--serving_image_uri {serving.serving_image_uri!r} is not a prebuilt TensorFlow prediction container, "
            f"e.g. {DEFAULT_SERVING_IMAGE} (or tf2-gpu.2-15 for GPUs)"
        )
    return {
        "displayName": serving.display_name,
        "artifactUri": artifact_uri(serving.model_dir),
        "containerSpec": {"imageUri": serving.serving_image_uri},
    }


def deploy_request(serving: Serving) -> dict:
    """The DeployedModel of `endpoints.deployModel` (REST body {"deployedModel": this, "trafficSplit": {"0": 100}})."""
    if not serving.model_id.strip() or not serving.endpoint_id.strip():
        raise ValueError("--action=deploy_model needs --model_id (printed by upload_model) and --endpoint_id "
                         "(printed by create_endpoint)")
    if not 1 <= serving.min_replica_count <= serving.max_replica_count:
        raise ValueError(f"--min_replica_count={serving.min_replica_count} and --max_replica_count="
                         f"{serving.max_replica_count}: need 1 <= min <= max")
    machine_spec = {"machineType": serving.machine_type}
    if serving.accelerator_type:
        if serving.accelerator_type.startswith("TPU"):
            raise ValueError(f"--accelerator_type {serving.accelerator_type}: the TensorFlow prediction containers "
                             "serve on CPUs and GPUs")
        machine_spec.update(acceleratorType=serving.accelerator_type, acceleratorCount=serving.accelerator_count or 1)
    model = serving.model_id if serving.model_id.startswith("projects/") else (
        f"projects/{serving.project or 'PROJECT'}/locations/{serving.region}/models/{serving.model_id}")
    return {
        "model": model,
        "displayName": serving.display_name,
        "dedicatedResources": {
            "machineSpec": machine_spec, "minReplicaCount": serving.min_replica_count,
            "maxReplicaCount": serving.max_replica_count,
        },
    }


def gcloud_command(action: str, serving: Serving) -> list[str]:
    """The `gcloud ai` command of one action, as an argument list (its request checked first)."""
    project = [f"--project={serving.project}"] if serving.project else []
    region = f"--region={serving.region}"
    if action == "upload_model":
        request = upload_request(serving)
        return ["gcloud", "ai", "models", "upload", *project, region, f"--display-name={serving.display_name}",
                f"--container-image-uri={request['containerSpec']['imageUri']}",
                f"--artifact-uri={request['artifactUri']}"]
    if action == "create_endpoint":
        return ["gcloud", "ai", "endpoints", "create", *project, region, f"--display-name={serving.display_name}"]
    if action == "deploy_model":
        request = deploy_request(serving)
        resources = request["dedicatedResources"]
        command = ["gcloud", "ai", "endpoints", "deploy-model", serving.endpoint_id, *project, region,
                   f"--model={serving.model_id}", f"--display-name={serving.display_name}",
                   f"--machine-type={resources['machineSpec']['machineType']}",
                   f"--min-replica-count={resources['minReplicaCount']}",
                   f"--max-replica-count={resources['maxReplicaCount']}", "--traffic-split=0=100"]
        if "acceleratorType" in resources["machineSpec"]:
            accelerator = resources["machineSpec"]["acceleratorType"].lower().replace("_", "-")
            command.append(f"--accelerator=type={accelerator},count={resources['machineSpec']['acceleratorCount']}")
        return command
    raise ValueError(f"--action {action!r} is not one of {', '.join(('train',) + ACTIONS)}")


def request_body(action: str, serving: Serving) -> dict:
    """The REST request body of an action (what --dry_run prints beside the command)."""
    if action == "upload_model":
        return {"model": upload_request(serving)}
    if action == "create_endpoint":
        return {"displayName": serving.display_name}
    return {"deployedModel": deploy_request(serving), "trafficSplit": {"0": 100}}
