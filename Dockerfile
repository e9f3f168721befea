# Container image for cloud training jobs (Vertex AI custom jobs, Kubernetes, TPU VMs run the package directly).
# GPU image: build with --build-arg BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/imagefolder-transfer:latest .
#   docker run --rm IMAGE --data_dir=gs://bucket/tfrecords --model_dir=gs://bucket/run1 --backbone=inception_v3
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0
FROM ${BASE_IMAGE}

WORKDIR /opt/imagefolder-transfer
COPY setup.py README.md ./
COPY tfrecords/ tfrecords/
COPY trainer/ trainer/
COPY launch/ launch/
RUN python -m pip install --no-cache-dir ".[lite,tflite]"

# Optional: bake pretrained weights in for clusters without internet access, e.g.
#   COPY weights/ /root/.keras/models/
# (Keras looks there before downloading), or pass --backbone=/path/backbone.keras --preprocess=...

ENTRYPOINT ["python", "-m", "trainer.train"]
