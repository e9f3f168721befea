r"""Growth curve: wall time and peak memory of each stage as the image folder grows (issue 16).

    python -m benchmarks.scale --sizes=10000,50000,200000 --work_dir=/tmp/scale

For each size it writes (once) a folder of that many small unique JPEGs in 10 classes, then measures:
- the local converter (python -m tfrecords.build, all cores): wall time and peak RSS of its largest process;
- the Beam converter (python -m tfrecords.beam_build) on Beam's portable runner with a local job service and
  an external worker pool: three kinds of process, as on Dataflow. "launcher" is this machine's part (what
  runs where the user types the command); "runner" stands for the Dataflow service (here its shuffle is in
  its memory, and it hands a worker a whole stage's data as one bundle, where Dataflow bounds bundles);
  "workers" are the SDK workers. Peak RSS of each, sampled every SAMPLE_SECONDS. Twice: given a --file_list
  (the path for buckets of millions of objects: the workers list) and given the local folder (the launcher
  lists it, as it does every local folder);
- phase-1 training (python -m trainer.train, 1 epoch, no phase 2, a random backbone of feature width 1280 at
  32 px, 2 augmented views per image) with the cached features in memory (the default budget) and spilled
  (--feature_cache_memory_mb=SPILL_BUDGET_MB): wall time and peak RSS.
Prints one row per size and the per-file slope of each column between the smallest and the largest size
(milliseconds or KiB per file): a flat column has a slope near 0. Timings on a shared 2-core machine vary
by some percent between runs; the slopes of memory do not. psutil (installed with tensorflow-datasets)
samples the memory.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
from absl import app, flags
from PIL import Image

from benchmarks import common

FLAGS = flags.FLAGS
flags.DEFINE_string("sizes", "10000,50000,200000", "Folder sizes (files), comma-separated, smallest first.")
flags.DEFINE_string("work_dir", "/tmp/scale_benchmark", "Where the generated folders and outputs go (kept for reruns).")
flags.DEFINE_list("stages", ["local", "beam", "train"], "Stages to measure: local, beam, train.")

NUM_CLASSES = 10
SAMPLE_SECONDS = 0.2
SPILL_BUDGET_MB = 4  # every split spilled at every size (the smallest, 1,000 test images, is 5 MiB)
JOB_SERVICE_PORT = 18099
WORKER_POOL_PORT = 18100
FEATURE_WIDTH = 1280


def write_folder(folder: str, num_files: int) -> str:
    """Writes num_files unique 24 x 24 JPEGs into NUM_CLASSES class folders, once.

    Each file is its class's JPEG with a comment segment naming the file: the same pixels, different bytes, so
    no file is a duplicate (the converter keeps them all) and writing 200,000 takes seconds.
    """
    if os.path.exists(os.path.join(folder, ".complete")):
        return folder
    rng = np.random.default_rng(0)
    for label in range(NUM_CLASSES):
        pixels = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="JPEG", quality=90)
        jpeg = encoded.getvalue()
        class_folder = os.path.join(folder, f"class_{label:02d}")
        os.makedirs(class_folder, exist_ok=True)
        for index in range(label, num_files, NUM_CLASSES):
            comment = f"file {index}".encode()
            segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
            with open(os.path.join(class_folder, f"{index:07d}.jpg"), "wb") as image_file:
                image_file.write(jpeg[:2] + segment + jpeg[2:])  # right after the start-of-image marker
    open(os.path.join(folder, ".complete"), "w").close()
    return folder


class PeakMemory:
    """Samples the resident memory of process trees in a thread; peak() gives each tree's peak, in MiB.

    A tree's memory is its largest process's (a forked worker shares its parent's pages, so a sum would count
    them twice), or with summed=True the sum of its processes (separate interpreters, like Beam's SDK workers).
    """

    def __init__(self, processes: dict, summed: tuple = ()):
        self.processes, self.summed = processes, summed
        self.peaks, self.running = {name: 0 for name in processes}, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while self.running:
            for name, process in self.processes.items():
                try:
                    tree = [process, *process.children(recursive=True)]
                    sizes = [member.memory_info().rss for member in tree if member.is_running()]
                except psutil.Error:
                    continue
                self.peaks[name] = max(self.peaks[name], sum(sizes) if name in self.summed else max(sizes, default=0))
            time.sleep(SAMPLE_SECONDS)

    def peak(self) -> dict:
        self.running = False
        self.thread.join()
        return {name: value / 2**20 for name, value in self.peaks.items()}


def run_measured(command: list, *, extra: dict | None = None) -> tuple:
    """Runs command; returns (seconds, {"main": peak MiB of its largest process, **peaks of the extra processes})."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=common.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = PeakMemory({"main": psutil.Process(process.pid), **(extra or {})}, summed=("workers",))
    stdout, stderr = process.communicate()
    seconds, peaks = time.perf_counter() - started, sampler.peak()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{stderr[-3000:]}")
    return seconds, peaks


def measure_local(folder: str, output_dir: str) -> dict:
    seconds, peaks = run_measured([
        sys.executable, "-m", "tfrecords.build", f"--input_dir={folder}", f"--output_dir={output_dir}", "--overwrite",
    ])
    return {"local s": seconds, "local MiB": peaks["main"]}


def write_file_list(folder: str) -> str:
    """Writes (once) the folder's files as a --file_list, as an object inventory would list a bucket."""
    path = folder.rstrip("/") + ".files.txt"
    if not os.path.exists(path):
        with open(path, "w") as list_file:
            for root, _, names in sorted(os.walk(folder)):
                list_file.writelines(f"{os.path.relpath(os.path.join(root, name), folder)}\n" for name in sorted(names)
                                     if name.endswith(".jpg"))
    return path


def measure_beam(folder: str, output_dir: str, *, file_list: str | None) -> dict:
    """The Beam converter with its runner and workers in processes of their own (started fresh for each run).

    With file_list the workers list the files (the launcher splits the list into byte ranges); without it the
    launcher lists the local folder itself (its link policy needs one view of the folder).
    """
    services = [
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
                          f"--port={JOB_SERVICE_PORT}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                          f"--service_port={WORKER_POOL_PORT}"], cwd=common.REPO_ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    name = "beam, file list" if file_list else "beam, folder"
    try:
        time.sleep(5)  # both services listening
        if any(service.poll() is not None for service in services):
            raise RuntimeError(f"the Beam job service or worker pool did not start: ports {JOB_SERVICE_PORT}, "
                               f"{WORKER_POOL_PORT} in use?")
        seconds, peaks = run_measured(
            [sys.executable, "-m", "tfrecords.beam_build", f"--input_dir={folder}", f"--output_dir={output_dir}",
             "--overwrite", "--runner=PortableRunner", f"--job_endpoint=localhost:{JOB_SERVICE_PORT}",
             "--environment_type=EXTERNAL", f"--environment_config=localhost:{WORKER_POOL_PORT}",
             *([f"--file_list={file_list}"] if file_list else [])],
            extra={"runner": psutil.Process(services[0].pid), "workers": psutil.Process(services[1].pid)},
        )
    finally:
        for service in services:
            service.terminate()
            service.wait()
    return {f"{name} s": seconds, f"{name}: launcher MiB": peaks["main"], f"{name}: runner MiB": peaks["runner"],
            f"{name}: workers MiB": peaks["workers"]}


def backbone_file(work_dir: str) -> str:
    """A random convolutional backbone of feature width FEATURE_WIDTH (what phase 1 caches per image)."""
    path = os.path.join(work_dir, "backbone_width_1280.keras")
    if not os.path.exists(path):
        import keras

        keras.Sequential([
            keras.Input((None, None, 3)),
            keras.layers.Conv2D(32, 3, strides=4, activation="relu"),
            keras.layers.Conv2D(FEATURE_WIDTH, 1, activation="relu"),
        ], name="width_1280").save(path)
    return path


def measure_train(data_dir: str, model_root: str, backbone: str) -> dict:
    row = {}
    for name, budget in (("memory", 4096), ("spilled", SPILL_BUDGET_MB)):
        shutil.rmtree(f"{model_root}_{name}", ignore_errors=True)  # a new run each time, not a resumed one
        seconds, peaks = run_measured([
            sys.executable, "-m", "trainer.train", f"--data_dir={data_dir}", f"--model_dir={model_root}_{name}",
            f"--backbone={backbone}", "--weights=imagenet", "--preprocess=tf", "--image_size=32", "--batch_size=256",
            "--epochs=1", "--fine_tune_epochs=0", f"--feature_cache_memory_mb={budget}",
        ])
        row[f"train {name} s"], row[f"train {name} MiB"] = seconds, peaks["main"]
    return row


def main(argv):
    del argv
    sizes = [int(size) for size in FLAGS.sizes.split(",")]
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    rows = {}
    for size in sizes:
        folder = write_folder(os.path.join(FLAGS.work_dir, f"images_{size}"), size)
        local_dir = os.path.join(FLAGS.work_dir, f"tfrecords_{size}")
        row = {}
        if "local" in FLAGS.stages:
            row.update(measure_local(folder, local_dir))
        if "beam" in FLAGS.stages:
            beam_dir = os.path.join(FLAGS.work_dir, f"tfrecords_beam_{size}")
            row.update(measure_beam(folder, beam_dir, file_list=write_file_list(folder)))
            row.update(measure_beam(folder, beam_dir, file_list=None))
        if "train" in FLAGS.stages:
            if not os.path.exists(os.path.join(local_dir, "manifest.json")):
                row.update(measure_local(folder, local_dir))
            row.update(measure_train(local_dir, os.path.join(FLAGS.work_dir, f"model_{size}"), backbone_file(FLAGS.work_dir)))
        rows[size] = row
        print(f"{size} files: " + ", ".join(f"{key} {value:.1f}" for key, value in row.items()), flush=True)
    print_table(rows)
    with open(os.path.join(FLAGS.work_dir, "scale.json"), "w") as result_file:
        json.dump(rows, result_file, indent=1)


def print_table(rows: dict) -> None:
    sizes = sorted(rows)
    columns = list(rows[sizes[0]])
    width = max(len(column) for column in columns) + 2
    print(f"\n{'':<{width}}" + "".join(f"{size:>12,}" for size in sizes) + "   slope per file")
    for column in columns:
        values = [rows[size][column] for size in sizes]
        slope = (values[-1] - values[0]) / (sizes[-1] - sizes[0]) if len(sizes) > 1 else float("nan")
        unit = f"{slope * 1000:8.3f} ms" if column.endswith(" s") else f"{slope * 1024:8.3f} KiB"
        print(f"{column:<{width}}" + "".join(f"{value:12.1f}" for value in values) + f"   {unit}")


if __name__ == "__main__":
    app.run(main)
