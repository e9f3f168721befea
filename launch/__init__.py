"""Launchers: run the trainer on several local processes, Vertex AI, Cloud TPU VMs or Kubernetes.

    python -m launch.local --num_workers=2 -- --data_dir=/tmp/demo_tfrecords --model_dir=/tmp/demo_model_mw

Each launcher builds a command or a job spec and passes the trainer's flags (everything after `--`)
through verbatim, adding only the flags its target decides (--strategy, and --tpu/--precision on TPUs) and
refusing trainer flags that contradict them. Nothing here imports `trainer`.

- local.py: N MultiWorkerMirroredStrategy processes on 127.0.0.1 with TF_CONFIG; forwards SIGTERM/SIGINT.
- vertex.py: a Vertex AI CustomJob (one GPU machine, chief + workers pools, or a TPU VM) via gcloud.
- tpu_vm.py: gcloud commands that create a TPU VM, install the package on every host and train there.
- kubernetes.py: an Indexed Job + headless Service manifest with per-pod TF_CONFIG and a podFailurePolicy.
- staging.py: builds the wheel and uploads it and local data to a gs:// staging folder.
- trainer_args.py: reading and adding trainer flags; the launchers' one-line `error: ...` exit 2.

Every launcher's `--dry_run` prints what it would run or submit. Exit code 75 from the trainer means
"preempted after saving a checkpoint: rerun the same command to resume"; the launchers keep that meaning.
"""
