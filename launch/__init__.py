"""Cloud and local launchers (Vertex AI, TPU VM, Kubernetes, local multi-worker).

A launcher builds a command or a job spec and passes the trainer's flags through verbatim; it never
imports `trainer`. None ships yet: they arrive with multi-worker support (see the README's Status).
Until then a cloud job runs the container built from the Dockerfile, whose entry point is
`python -m trainer.train` (see BUILD.md).
"""
